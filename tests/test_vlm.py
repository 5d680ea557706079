"""Vision-language models: a vision tower merged inside a model that generates."""

import pytest
import torch

import tome_fx

transformers = pytest.importorskip("transformers")

PATCHES = (32 // 4) ** 2  # a 32 px image in 4 px patches
IMAGE = 99  # the image placeholder token


def _llava(dtype=torch.float32):
    """HF Llava, tiny: a 3-layer CLIP tower (features from its second-to-last layer, class
    token dropped) and a 2-layer Llama."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    return transformers.LlavaForConditionalGeneration(config).eval().to(dtype)


def _prompt(batch=2, images=1, dtype=torch.float32):
    """What a processor returns: text around each image's run of placeholders."""
    run = [IMAGE] * PATCHES
    ids = torch.tensor([[1, 5, 6] + sum(([10 + i] + run for i in range(images)), []) + [7, 8, 9]] * batch)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(batch * images, 3, 32, 32, dtype=dtype))


def test_scope_on_a_model_that_generates_swaps_the_tower_and_generate_works():
    """The tower is captured where Llava calls it and swapped into a shallow copy: at r=0
    logits and generated ids are bit for bit the original's; merging, generate() runs."""
    model, x = _llava(), _prompt()
    same = tome_fx.transform(model, 0, example_inputs=x, scope="model.vision_tower")
    assert type(same) is type(model) and isinstance(same.model.vision_tower, tome_fx.ToMeModel)
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"  # the original is untouched
    assert list(same.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert torch.equal(same(**x).logits, model(**x).logits)
    want = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert torch.equal(same.generate(**x, max_new_tokens=4, do_sample=False), want)
    fast = tome_fx.transform(model, 4, example_inputs=x, scope="model.vision_tower")
    assert fast.model.vision_tower.token_counts == [65, 61, 57, 53]
    assert fast.generate(**x, max_new_tokens=4, do_sample=False).shape == want.shape


def test_scope_on_a_model_that_generates_refuses_merged_outputs_and_unreached_parts():
    model, x = _llava(), _prompt()
    with pytest.raises(ValueError, match="tome_fx.vlm.apply"):
        tome_fx.transform(model, 4, example_inputs=x, scope="model.vision_tower", unmerge_outputs=False)
    text_only = {k: v for k, v in x.items() if k != "pixel_values"}
    text_only["input_ids"] = torch.tensor([[1, 5, 6]] * 2)
    text_only["attention_mask"] = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="not called when the model runs on example_inputs"):
        tome_fx.transform(model, 4, example_inputs=text_only, scope="model.vision_tower")


def _prefill_tokens(model) -> list[int]:
    """Records the sequence length of every language-model call."""
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    return seen


def test_keeping_every_visual_token_is_the_original_bit_for_bit():
    model, x = _llava(), _prompt()
    same = tome_fx.vlm.apply(model, keep=PATCHES)
    with torch.no_grad():
        assert torch.equal(same(**x).logits, model(**x).logits)
    assert torch.equal(same.generate(**x, max_new_tokens=4, do_sample=False),
                       model.generate(**x, max_new_tokens=4, do_sample=False))
    assert tome_fx.vlm.remove(same) is model and type(model.model.vision_tower).__name__ == "CLIPVisionModel"


@pytest.mark.parametrize("how, kept", [(dict(keep=16), 16), (dict(ratio=0.5), 32), (dict(ratio=8), 64 - 16)])
def test_the_language_model_gets_fewer_visual_tokens_and_generate_works(how, kept):
    """``keep``, ``ratio`` or ToMe's r (merging only in the blocks before Llava's feature
    layer): the prompt is cut inside the call, two images per prompt, and ``generate``
    returns the caller's prompt followed by the new tokens."""
    model, x = _llava(), _prompt(images=2)
    fast = tome_fx.vlm.apply(model, **how)
    seen = _prefill_tokens(fast)
    with torch.no_grad():
        logits = fast(**x).logits
    text = x["input_ids"].shape[1] - 2 * PATCHES
    assert seen == [text + 2 * kept] and logits.shape[1] == text + 2 * kept
    sizes = tome_fx.vlm.visual_token_sizes(fast)
    assert [s.shape for s in sizes] == [(kept,)] * 4 and all(s.sum() == PATCHES for s in sizes)
    out = fast.generate(**x, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 3) and torch.equal(out[:, : x["input_ids"].shape[1]], x["input_ids"])
    assert seen[1:] == [text + 2 * kept, 1, 1]  # prefill on the cut prompt, then one token per step


def test_vlm_apply_refuses_what_it_cannot_do():
    model, x = _llava(), _prompt()
    with pytest.raises(ValueError, match="2 blocks can merge at most 48 of 65 tokens"):
        tome_fx.vlm.apply(model, keep=4)(**x)
    with pytest.raises(TypeError, match="one of ratio"):
        tome_fx.vlm.apply(model)
    with pytest.raises(ValueError, match="input_ids"):
        embeds = model.get_input_embeddings()(x.pop("input_ids"))
        tome_fx.vlm.apply(model, keep=16)(inputs_embeds=embeds, **x)


def test_the_merging_tower_compiles_to_its_eager_output():
    model, x = _llava(), _prompt()
    fast = tome_fx.vlm.apply(model, keep=16)
    with torch.no_grad():
        fast(**x)
        (tower,) = fast.model.vision_tower._tome_tower.graphs.values()
        args, kwargs = tower._call.original_call()  # as Llava called it
        want = tower(*args, **kwargs).hidden_states[-2]
        got = torch.compile(tower)(*args, **kwargs).hidden_states[-2]
    assert want.shape == (2, 17, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _paligemma(attention="sdpa"):
    """HF PaliGemma, tiny, float64: a 2-layer SigLIP tower (no class token, learned positions
    zeroed) and a 2-layer Gemma whose prefix (image and prompt) attends both ways."""
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=4)
    text = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, vocab_size=128)
    config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projection_dim=32)
    config._attn_implementation = attention
    model = transformers.PaliGemmaForConditionalGeneration(config).eval().double()
    model.model.vision_tower.embeddings.position_embedding.weight.data.zero_()
    return model


def _twin_patches(batch=2):
    """Images whose patches come in identical pairs along each row (tokens 2i and 2i+1)."""
    half = torch.randn(batch, 3, 32, 4, 4, dtype=torch.float64)  # 4 distinct 4 px patch columns
    return half.unsqueeze(4).expand(-1, -1, -1, -1, 2, -1).reshape(batch, 3, 32, 32)


def test_merging_duplicate_patches_is_exact_through_the_language_model_with_prop_attn():
    """The duplicate oracle end to end: twins merge in the tower, and with log(size) on each
    visual key and positions equal within pairs, the prompt's logits are the original's
    (float64). Without proportional attention they are not."""
    model = _paligemma()
    ids = torch.cat([torch.full((2, PATCHES), IMAGE), torch.tensor([[2, 5, 6, 7]] * 2)], 1)
    positions = torch.cat([torch.arange(PATCHES) // 2, PATCHES // 2 + torch.arange(4)]).expand(2, -1)
    x = dict(input_ids=ids, pixel_values=_twin_patches(), attention_mask=torch.ones_like(ids),
             token_type_ids=torch.zeros_like(ids), position_ids=positions)
    with torch.no_grad():
        want = model(**x).logits[:, PATCHES:]
        exact = tome_fx.vlm.apply(model, [PATCHES // 2], prop_attn=True)
        got = exact(**x).logits
        assert got.shape[1] == PATCHES // 2 + 4 and tome_fx.vlm.visual_token_sizes(exact).eq(2).all()
        torch.testing.assert_close(got[:, PATCHES // 2:], want, rtol=1e-10, atol=1e-10)
        plain = tome_fx.vlm.apply(model, [PATCHES // 2])(**x).logits
        assert (plain[:, PATCHES // 2:] - want).abs().max() > 1e-4


def test_generation_keeps_the_visual_key_sizes_in_the_cache():
    """With ``prop_attn``, a decode step (cached keys) computes what a fresh call over the
    whole sequence does: the visual keys' log(size) holds beyond the prefill."""
    model = _paligemma()
    ids = torch.cat([torch.full((1, PATCHES), IMAGE), torch.tensor([[2, 5, 6, 7]])], 1)
    x = dict(input_ids=ids, pixel_values=_twin_patches(1) + torch.randn(1, 3, 32, 32, dtype=torch.float64),
             attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    fast = tome_fx.vlm.apply(model, keep=24, prop_attn=True)
    out = fast.generate(**x, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    first = out.sequences[:, ids.shape[1]:][:, :1]
    again = dict(x, input_ids=torch.cat([ids, first], 1), attention_mask=torch.ones(1, ids.shape[1] + 1).long(),
                 token_type_ids=torch.cat([x["token_type_ids"], torch.ones_like(first)], 1))
    with torch.no_grad():
        torch.testing.assert_close(out.logits[1].double(), fast(**again).logits[:, -1], rtol=1e-6, atol=1e-6)  # float32 scores
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        tome_fx.vlm.apply(_paligemma("eager"), keep=24, prop_attn=True)


def _qwen2_vl(v2_5=False):
    """HF Qwen2-VL (or Qwen2.5-VL: windowed attention in its first block), tiny: a 2-layer
    tower over 4 px patches with its 2 x 2 merger, M-RoPE; one 32 px image (8 x 8 patches,
    16 tokens after the merger)."""
    torch.manual_seed(0)
    patches = dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    vision = (dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, window_size=16,
                   fullatt_block_indexes=[1], **patches) if v2_5 else
              dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, **patches))
    config = (transformers.Qwen2_5_VLConfig if v2_5 else transformers.Qwen2VLConfig)(
        vision_config=vision,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=160, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=150, vision_start_token_id=151, vision_end_token_id=152, video_token_id=153)
    config._attn_implementation = "sdpa"
    model = (transformers.Qwen2_5_VLForConditionalGeneration if v2_5 else
             transformers.Qwen2VLForConditionalGeneration)(config).eval()
    ids = torch.cat([torch.tensor([[1, 151]]), torch.full((1, 16), 150), torch.tensor([[152, 5, 6]])], 1)
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(64, 96),
                       image_grid_thw=torch.tensor([[1, 8, 8]]), mm_token_type_ids=(ids == 150).int())


def test_a_tower_that_cannot_be_captured_is_refused_naming_it():
    """Qwen2-VL's tower takes all images' patches as one sequence whose split depends on
    ``image_grid_thw``'s values: merging inside it is refused, naming the tower and
    ``where='output'``, not half-merged."""
    model, x = _qwen2_vl()
    with pytest.raises(tome_fx.UnsupportedModelError, match="Qwen2VisionTransformerPretrainedModel.*where='output'"):
        tome_fx.vlm.apply(model, keep=8)(**x)


@pytest.mark.parametrize("v2_5", [False, True], ids=["qwen2-vl", "qwen2.5-vl"])
def test_merging_the_towers_output_with_mrope_positions(v2_5):
    """``where="output"``: Qwen2-VL's (and 2.5-VL's) image features merge after the patch
    merger; each merged token sits at the mean of its features' M-RoPE positions. Keeping
    every token is the original (logits and generated ids); merging, the language model
    gets the cut prompt and generate() runs."""
    model, x = _qwen2_vl(v2_5)
    with torch.no_grad():
        same = tome_fx.vlm.apply(model, keep=16, where="output")
        assert torch.equal(same(**x).logits, model(**x).logits)
        assert torch.equal(same.generate(**x, max_new_tokens=3, do_sample=False),
                           model.generate(**x, max_new_tokens=3, do_sample=False))
        fast = tome_fx.vlm.apply(model, keep=6, where="output", prop_attn=True)
        seen = _prefill_tokens(fast)
        assert fast(**x).logits.shape[1] == 2 + 6 + 3 == seen[0]
        assert tome_fx.vlm.visual_token_sizes(fast).sum() == 16
        assert fast.generate(**x, max_new_tokens=3, do_sample=False).shape == (1, x["input_ids"].shape[1] + 3)
    with pytest.raises(ValueError, match="give keep= or a ratio"):
        tome_fx.vlm.apply(model, 4, where="output")


def test_proportional_attention_follows_the_cache_not_the_call():
    """log(size) goes on the keys the merged visual tokens sit at, however the prompt is fed:
    a prefill split in chunks (the first without the image) equals one call; a text-only
    prompt after an image prompt gets no bias; a static cache works."""
    model, x = _llava(), _prompt(batch=1)
    ids = torch.cat([torch.arange(20, 40)[None], x["input_ids"]], 1)
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=x["pixel_values"])
    fast = tome_fx.vlm.apply(model, keep=16, prop_attn=True)
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    whole = fast.generate(**x, **settings).logits
    chunked = fast.generate(**x, prefill_chunk_size=8, **settings).logits
    torch.testing.assert_close(torch.stack(chunked), torch.stack(whole))
    text = dict(input_ids=torch.arange(1, 31)[None], attention_mask=torch.ones(1, 30, dtype=torch.long))
    torch.testing.assert_close(torch.stack(fast.generate(**text, **settings).logits),
                               torch.stack(model.generate(**text, **settings).logits))
    assert fast.generate(**x, max_new_tokens=3, do_sample=False, cache_implementation="static").shape == (1, ids.shape[1] + 3)


def test_a_cache_holding_a_cut_prompt_is_refused_with_the_uncut_ids():
    model, x = _llava(), _prompt(batch=1)
    fast = tome_fx.vlm.apply(model, keep=16)
    out = fast.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    more = torch.cat([out.sequences, torch.tensor([[30, 31, 32]])], 1)
    with pytest.raises(ValueError, match="call again without the cache"):
        fast.generate(input_ids=more, attention_mask=torch.ones_like(more), cache=out.cache, max_new_tokens=2)


def test_the_copy_is_independent_of_the_original_and_pickles():
    """Modes and hooks on the copy stay on the copy (its modules are its own, the
    parameters shared); pickling stores the original and the settings."""
    import copy
    import pickle

    model, x = _llava(), _prompt(batch=1)
    fast = tome_fx.vlm.apply(model, [8, 8])  # one r per block feeding the features
    again = pickle.loads(pickle.dumps(fast))  # before any call: HF's output hooks, installed then, do not pickle
    seen = []
    fast.model.language_model.register_forward_hook(lambda *_: seen.append(1))
    fast.train()
    assert not model.training and not model.model.language_model.training
    with torch.no_grad():
        model(**x)
        assert not seen  # the hook is the copy's
        fast.eval()
        want = fast(**x).logits
        assert type(again) is type(fast) and torch.equal(again(**x).logits, want)
        assert torch.equal(copy.deepcopy(fast)(**x).logits, want)
    assert next(again.parameters()) is not next(model.parameters())  # a copy of the original came with it
    with pytest.raises(ValueError, match="2 of the tower's 3 blocks feed the image features"):
        tome_fx.vlm.apply(model, [8, 8, 8])(**x)


def test_a_model_that_pools_its_tower_tokens_is_refused():
    """Gemma 3's projector pools the tower's 64 tokens into 16 placeholders: merged tokens
    would have no place of their own."""
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=4)
    text = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, vocab_size=300, sliding_window=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                                       image_token_index=262, boi_token_index=260, eoi_token_index=261)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.tensor([[2, 5, 260] + [262] * 16 + [261, 7, 8]])
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 32, 32),
             token_type_ids=(ids == 262).long())
    with pytest.raises(tome_fx.UnsupportedModelError, match="16 placeholders per image and the vision tower"):
        tome_fx.vlm.apply(model, keep=8)(**x)


def test_scope_on_the_part_that_decodes_is_refused():
    model, x = _llava(), _prompt()
    with pytest.raises(tome_fx.UnsupportedModelError, match="takes a key/value cache"):
        tome_fx.transform(model, 2, example_inputs=x, scope="model.language_model")


def test_proportional_attention_reads_each_rows_own_visual_tokens():
    """Rows whose images sit at different columns: a prefill split in chunks gives every row
    the same keys' sizes as one call; with rows of 2 and 1 images, keeping every token is the
    original; ``use_cache=False`` (the whole prompt again at each step) works."""
    model, _ = _qwen2_vl()
    image = [150] * 16 + [152]
    ids = torch.tensor([[1, 151] + image + [5, 6, 7], [1, 2, 3, 151] + image + [5], image + [5, 6, 7, 8, 9]])
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(192, 96),
             image_grid_thw=torch.tensor([[1, 8, 8]] * 3), mm_token_type_ids=(ids == 150).int())
    fast = tome_fx.vlm.apply(model, keep=6, where="output", prop_attn=True)
    settings = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    whole = fast.generate(**x, **settings)
    torch.testing.assert_close(torch.stack(fast.generate(**x, prefill_chunk_size=6, **settings).logits),
                               torch.stack(whole.logits))
    assert torch.equal(fast.generate(**x, use_cache=False, max_new_tokens=2, do_sample=False), whole.sequences)
    llava, two_then_one = _llava(), _prompt(batch=1, images=2)
    ids = torch.cat([two_then_one["input_ids"], torch.cat([torch.zeros(1, PATCHES + 1, dtype=torch.long),
                                                           _prompt(batch=1)["input_ids"]], 1)])
    mask = (ids != 0).long()
    y = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(tome_fx.vlm.apply(llava, keep=PATCHES, prop_attn=True)(**y).logits, llava(**y).logits)


def test_a_manual_decoding_loop_continues_the_mrope_positions():
    """Outside generate(), a step on the returned cache places the new token where a fresh
    call over the whole sequence does (the cut sets the model's rope offsets)."""
    model, x = _qwen2_vl()
    fast = tome_fx.vlm.apply(model, keep=6, where="output")
    with torch.no_grad():
        step = fast(input_ids=torch.tensor([[9]]), cache=fast(**x, use_cache=True).cache).logits[:, -1]
        again = dict(x, input_ids=torch.cat([x["input_ids"], torch.tensor([[9]])], 1),
                     attention_mask=torch.ones(1, x["input_ids"].shape[1] + 1, dtype=torch.long),
                     mm_token_type_ids=torch.cat([x["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.int)], 1))
        torch.testing.assert_close(step, fast(**again).logits[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(tome_fx.UnsupportedModelError, match="video inputs"):
        fast(**x, pixel_values_videos=torch.randn(64, 96), video_grid_thw=torch.tensor([[1, 8, 8]]))
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        fast(**{k: v for k, v in x.items() if k != "mm_token_type_ids"})
