"""Tiny random-init zoo of Hugging Face transformers vision models (transformers 5.25).

``HF = {name: (factory, input_factory)}``

* ``name``            transformers model class name.
* ``factory()``       returns the model built from a tiny config at random init, in eval mode.
* ``input_factory(b)`` returns ``(args, kwargs)`` for ``model(*args, **kwargs)`` at batch ``b``.

``CONFIGS[name]`` holds the config keyword arguments used (for reporting) and
``FAMILY[name]`` a short family label ("(X copy)" marks a class copied from family X).
``PACKED`` names the entries whose input packs the whole batch into one token sequence
(NaViT / Qwen2-VL style, no batch axis inside the encoder); ``CONTROLS`` the entries without
attention.  Nothing is downloaded: every model is built from a config.  Configs are small
(hidden 16-64, 1-2 layers per stage, 32-64 px); the usual plain-ViT setting is 32 px with
patch 4, i.e. 64 patch tokens.
"""

import tome_fx  # noqa: F401  (must be imported before transformers / timm / torchvision)

import torch
import transformers as T
# vision towers that are not exported at the top level of ``transformers``
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerVisionModel
from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2VisionEncoder
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionModel
from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionModel
from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionModel
from transformers.models.ovis2.modeling_ovis2 import Ovis2VisionModel
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder
from transformers.models.slanext.modeling_slanext import SLANeXtVisionEncoder

HF = {}
CONFIGS = {}
FAMILY = {}


def _register(name, family, config_cls, inputs, model_cls=None, **cfg):
    """Register ``name`` (a transformers class) built from ``config_cls(**cfg)``.

    ``model_cls`` is only needed for classes not exported at the top level of ``transformers``.
    """
    model_cls = model_cls or getattr(T, name)

    def factory():
        torch.manual_seed(0)
        return model_cls(config_cls(**cfg)).eval()

    factory.__name__ = f"make_{name}"
    HF[name] = (factory, inputs)
    CONFIGS[name] = cfg
    FAMILY[name] = family


# --------------------------------------------------------------------------- inputs
def images(size, channels=3):
    """Image batch ``(b, C, H, W)``; ``size`` is an int or an ``(H, W)`` pair."""
    h, w = (size, size) if isinstance(size, int) else size

    def make(batch):
        return (torch.randn(batch, channels, h, w),), {}

    return make


def video(frames, size, channels=3):
    """Video batch ``(b, T, C, H, W)``."""

    def make(batch):
        return (torch.randn(batch, frames, channels, size, size),), {}

    return make


def frames_flat(frames, size, channels=3):
    """Video given as frames stacked on the batch axis: ``(b * T, C, H, W)``."""

    def make(batch):
        return (torch.randn(batch * frames, channels, size, size),), {}

    return make


def patches(grid, patch, channels=3):
    """Pre-patchified image batch ``(b, grid*grid, C*patch*patch)`` (linear patch embedding)."""

    def make(batch):
        return (torch.randn(batch, grid * grid, channels * patch * patch),), {}

    return make


def siglip2_patches(grid, patch, channels=3):
    """Siglip2 NaFlex input: pre-patchified pixels, a patch mask and the spatial grid."""

    def make(batch):
        n = grid * grid
        pixel_values = torch.randn(batch, n, channels * patch * patch)
        mask = torch.ones(batch, n, dtype=torch.long)
        shapes = torch.tensor([[grid, grid]] * batch, dtype=torch.long)
        return (pixel_values,), {"pixel_attention_mask": mask, "spatial_shapes": shapes}

    return make


def pix2struct_patches(grid, patch, channels=3):
    """Pix2Struct-style flattened patches: ``[row, col, pixels...]`` per patch, plus mask."""

    def make(batch):
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        ids = torch.stack([rows.flatten(), cols.flatten()], -1).float() + 1  # ids are 1-based
        pixels = torch.randn(batch, grid * grid, channels * patch * patch)
        flat = torch.cat([ids.expand(batch, -1, -1), pixels], -1)
        mask = torch.ones(batch, grid * grid, dtype=torch.long)
        return (flat,), {"attention_mask": mask}

    return make


def packed_patches(grid, patch, temporal=1, channels=3, merge_sizes=False):
    """Qwen2-VL style packed input: all patches of all images in one sequence + ``grid_thw``."""

    def make(batch):
        hidden = torch.randn(batch * grid * grid, channels * temporal * patch * patch)
        kwargs = {"grid_thw": torch.tensor([[1, grid, grid]] * batch)}
        if merge_sizes:
            kwargs["merge_sizes"] = torch.ones(batch, dtype=torch.long)
        return (hidden,), kwargs

    return make


def packed_patch_images(grid, patch, channels=3):
    """Kimi-K2.5 style packed input: ``(total_patches, C, p, p)`` + ``grid_thw``."""

    def make(batch):
        pixel_values = torch.randn(batch * grid * grid, channels, patch, patch)
        return (pixel_values,), {"grid_thw": torch.tensor([[1, grid, grid]] * batch)}

    return make


def paddle_patches(grid, patch, channels=3):
    """PaddleOCR-VL: ``(1, total_patches, C, p, p)`` with ``grid_thw`` (images packed on one row)."""

    def make(batch):
        pixel_values = torch.randn(1, batch * grid * grid, channels, patch, patch)
        return (pixel_values,), {"grid_thw": torch.tensor([[1, grid, grid]] * batch)}

    return make


def gemma4_patches(grid, patch, channels=3):
    """Gemma4 vision: patchified pixels in [0, 1] and their (x, y) positions."""

    def make(batch):
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        pos = torch.stack([xs.flatten(), ys.flatten()], -1).expand(batch, -1, -1).contiguous()
        return (torch.rand(batch, grid * grid, channels * patch * patch), pos), {}

    return make


def pixtral_images(size, channels=3):
    """Pixtral: image batch plus each image's ``(H, W)``."""

    def make(batch):
        return (torch.randn(batch, channels, size, size),), {"image_sizes": torch.tensor([[size, size]] * batch)}

    return make


def mllama_tiles(size, tiles, channels=3):
    """Mllama: ``(b, images=1, tiles, C, H, W)`` with aspect-ratio id 1 (one tile row) and tile mask."""

    def make(batch):
        pixel_values = torch.randn(batch, 1, tiles, channels, size, size)
        ratio_ids = torch.ones(batch, 1, dtype=torch.long)
        ratio_mask = torch.ones(batch, 1, tiles, dtype=torch.long)
        return (pixel_values,), {"aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": ratio_mask}

    return make


def seggpt_inputs(size):
    """SegGPT: input image, prompt image and prompt mask, each ``(b, 3, size, size)``.

    The model stacks image and prompt along the height, so its config uses ``image_size=(2*size, size)``.
    """
    h = w = size

    def make(batch):
        return (torch.randn(batch, 3, h, w), torch.randn(batch, 3, h, w), torch.randn(batch, 3, h, w)), {}

    return make


def video_kw(frames, size, key="pixel_values_videos", channels=3, **extra):
    """Video batch passed by keyword (V-JEPA 2, VideoPrism)."""

    def make(batch):
        return (), {key: torch.randn(batch, frames, channels, size, size), **extra}

    return make


def pixel_tokens(side, vocab):
    """ImageGPT: colour-cluster token ids of a ``side x side`` image."""

    def make(batch):
        return (torch.randint(0, vocab - 1, (batch, side * side)),), {}

    return make


def inkling2_tokens(grid, patch, merge=2, channels=3):
    """Inkling2: one ``(p*merge, p*merge, C)`` pixel block per language-model image token, in [-1, 1]."""
    side = grid // merge

    def make(batch):
        pixel_values = torch.rand(batch * side * side, patch * merge, patch * merge, channels) * 2 - 1
        return (pixel_values,), {"image_grid_thw": torch.tensor([[1, side, side]] * batch)}

    return make


def minicpm_strip(grid, patch, channels=3):
    """MiniCPM-V: every patch of every image laid side by side in one ``(1, C, p, N*p)`` strip."""

    def make(batch):
        pixel_values = torch.randn(1, channels, patch, batch * grid * grid * patch)
        return (pixel_values,), {"target_sizes": torch.tensor([[grid, grid]] * batch)}

    return make


# --------------------------------------------------------------------------- shared tiny configs
# plain ViT encoder: 32 px, patch 4 -> 8x8 = 64 patch tokens, 2 layers, width 32, 4 heads
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
           image_size=32, patch_size=4)
# DINOv2-style configs take mlp_ratio instead of intermediate_size
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
            image_size=32, patch_size=4)
# Swin-style hierarchical: 32 px, patch 2 -> 16x16, two stages, window 4
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
            drop_path_rate=0.0)
# Mix-Transformer (Segformer / GLPN) 4-stage pyramid at 64 px
MIT = dict(num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[16, 32, 48, 64],
           num_attention_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2], drop_path_rate=0.0)

# --------------------------------------------------------------------------- plain ViT family
_register("ViTModel", "ViT", T.ViTConfig, images(32), **VIT)
_register("DeiTModel", "DeiT", T.DeiTConfig, images(32), **VIT)
_register("BeitModel", "BEiT", T.BeitConfig, images(32), **VIT, use_relative_position_bias=True,
          drop_path_rate=0.0)
_register("Data2VecVisionModel", "Data2VecVision", T.Data2VecVisionConfig, images(32), **VIT,
          use_shared_relative_position_bias=True, drop_path_rate=0.0)
_register("Dinov2Model", "DINOv2", T.Dinov2Config, images(32), **DINO)
_register("Dinov2WithRegistersModel", "DINOv2+registers", T.Dinov2WithRegistersConfig, images(32), **DINO,
          num_register_tokens=4)
_register("DINOv3ViTModel", "DINOv3 ViT", T.DINOv3ViTConfig, images(32), hidden_size=32, num_hidden_layers=2,
          num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=4, num_register_tokens=4)
_register("ViTMAEModel", "ViTMAE", T.ViTMAEConfig, images(32), **VIT, mask_ratio=0.75)
_register("ViTMSNModel", "ViTMSN", T.ViTMSNConfig, images(32), **VIT)
_register("IJepaModel", "I-JEPA", T.IJepaConfig, images(32), **VIT)
_register("YolosModel", "YOLOS", T.YolosConfig, images(32), **{**VIT, "image_size": [32, 32]},
          num_detection_tokens=10)
_register("DPTModel", "DPT", T.DPTConfig, images(32), **VIT, backbone_out_indices=[0, 1],
          neck_hidden_sizes=[16, 32], fusion_hidden_size=32, reassemble_factors=[4, 2])
_register("VitDetModel", "ViTDet", T.VitDetConfig, images(32), hidden_size=32, num_hidden_layers=2,
          num_attention_heads=4, mlp_ratio=2, image_size=32, pretrain_image_size=32, patch_size=4,
          window_block_indices=[0], window_size=4, use_relative_position_embeddings=True)
_register("VitPoseBackbone", "ViTPose backbone", T.VitPoseBackboneConfig, images((64, 48)),
          image_size=[64, 48], patch_size=[8, 8], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          mlp_ratio=2, out_indices=[2])

# --------------------------------------------------------------------------- CLIP-style towers
_register("CLIPVisionModel", "CLIP", T.CLIPVisionConfig, images(32), **VIT)
_register("SiglipVisionModel", "SigLIP", T.SiglipVisionConfig, images(32), **VIT)
_register("Siglip2VisionModel", "SigLIP2 (NaFlex)", T.Siglip2VisionConfig, siglip2_patches(8, 4),
          hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=4,
          num_patches=64)
_register("Aimv2VisionModel", "AIMv2", T.Aimv2VisionConfig, images(32), **VIT)
_register("BlipVisionModel", "BLIP", T.BlipVisionConfig, images(32), **VIT)
_register("Owlv2VisionModel", "OWLv2", T.Owlv2VisionConfig, images(32), **VIT)
_register("GroupViTVisionModel", "GroupViT", T.GroupViTVisionConfig, images(32), hidden_size=32,
          intermediate_size=37, num_attention_heads=4, depths=[1, 1, 1], num_hidden_layers=3,
          num_group_tokens=[16, 8, 0], num_output_groups=[16, 8, 8], image_size=32, patch_size=4)
_register("XCLIPVisionModel", "X-CLIP", T.XCLIPVisionConfig, frames_flat(2, 32), **VIT, num_frames=2,
          mit_hidden_size=32, mit_intermediate_size=37, mit_num_hidden_layers=1, mit_num_attention_heads=4)
_register("Pix2StructVisionModel", "Pix2Struct", T.Pix2StructVisionConfig, pix2struct_patches(8, 4),
          hidden_size=32, patch_embed_hidden_size=48, d_ff=37, d_kv=8, num_hidden_layers=2,
          num_attention_heads=4, seq_len=64)

# --------------------------------------------------------------------------- video
_register("VideoMAEModel", "VideoMAE", T.VideoMAEConfig, video(4, 32), **VIT, num_frames=4, tubelet_size=2)
_register("VivitModel", "ViViT", T.VivitConfig, video(4, 32), hidden_size=32, num_hidden_layers=2,
          num_attention_heads=4, intermediate_size=37, image_size=32, num_frames=4, tubelet_size=[2, 4, 4])
_register("TimesformerModel", "TimeSformer", T.TimesformerConfig, video(2, 32), **VIT, num_frames=2)

# --------------------------------------------------------------------------- hierarchical / windowed
_register("SwinModel", "Swin", T.SwinConfig, images(32), **SWIN)
_register("Swinv2Model", "Swin V2", T.Swinv2Config, images(32), **SWIN, pretrained_window_sizes=[0, 0])
_register("DonutSwinModel", "Donut Swin", T.DonutSwinConfig, images(32), **SWIN)
_register("MaskFormerSwinModel", "MaskFormer Swin", T.MaskFormerSwinConfig, images(32), **SWIN)
_register("HieraModel", "Hiera", T.HieraConfig, images(64), embed_dim=8, image_size=[64, 64], patch_size=[7, 7],
          patch_stride=[4, 4], patch_padding=[3, 3], masked_unit_size=[8, 8], mlp_ratio=1.0,
          depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], embed_dim_multiplier=2.0)
_register("PvtModel", "PVT", T.PvtConfig, images(64), image_size=64, num_encoder_blocks=4, depths=[1, 1, 1, 1],
          sequence_reduction_ratios=[8, 4, 2, 1], hidden_sizes=[16, 32, 48, 64], patch_sizes=[4, 2, 2, 2],
          strides=[4, 2, 2, 2], num_attention_heads=[1, 2, 3, 4], mlp_ratios=[2, 2, 2, 2])
_register("PvtV2Model", "PVTv2", T.PvtV2Config, images(64), image_size=64, **MIT)
_register("SegformerModel", "SegFormer (MiT)", T.SegformerConfig, images(64), **MIT)
_register("GLPNModel", "GLPN (MiT)", T.GLPNConfig, images(64), **MIT, decoder_hidden_size=16)
# CvT needs depth[i] > i: the stage code indexes its per-layer drop-path list by stage index
_register("CvtModel", "CvT", T.CvtConfig, images(64), embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
          depth=[1, 2, 3], drop_path_rate=[0.0, 0.0, 0.0])
_register("LevitModel", "LeViT", T.LevitConfig, images(64), image_size=64, hidden_sizes=[16, 32, 48],
          num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16)
_register("MobileViTModel", "MobileViT", T.MobileViTConfig, images(64), image_size=64, hidden_sizes=[16, 24, 32],
          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=4)
_register("MobileViTV2Model", "MobileViTV2 (separable attention)", T.MobileViTV2Config, images(64), image_size=64,
          width_multiplier=0.25, n_attn_blocks=[1, 1, 1])

# --------------------------------------------------------------------------- SAM image encoder
_register("SamVisionModel", "SAM ViT", T.SamVisionConfig, images(64), hidden_size=32, output_channels=16,
          num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8, window_size=4,
          global_attn_indexes=[1], mlp_dim=64)  # 8x8 patch grid, one windowed (4x4) and one global layer

# --------------------------------------------------------------------------- DETR (attention over CNN features)
_register("DetrModel", "DETR (transformer encoder/decoder on ResNet features)", T.DetrConfig, images(64),
          backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                               depths=[1, 1, 1, 1], out_features=["stage4"]),
          num_queries=10, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=37, decoder_ffn_dim=37, d_model=32,
          encoder_attention_heads=4, decoder_attention_heads=4)

# --------------------------------------------------------------------------- Perception Encoder (timm)
_register("TimmWrapperModel", "Perception Encoder (timm vit_pe_core via TimmWrapper)", T.TimmWrapperConfig,
          images(32), architecture="vit_pe_core_tiny_patch16_384",
          model_args=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4))

# --------------------------------------------------------------------------- non-attention controls
_register("ConvNextModel", "ConvNeXt (control, no attention)", T.ConvNextConfig, images(32),
          hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)
_register("FocalNetModel", "FocalNet (control, focal modulation)", T.FocalNetConfig, images(32), embed_dim=16,
          depths=[1, 1], hidden_sizes=[16, 32], focal_levels=[2, 2], focal_windows=[3, 3], patch_size=2,
          image_size=32, drop_path_rate=0.0)

# --------------------------------------------------------------------------- copies inside other model families
# (separate classes, same attention pattern as the family named in the label)
_register("AltCLIPVisionModel", "AltCLIP (CLIP copy)", T.AltCLIPVisionConfig, images(32), **VIT)
_register("ChineseCLIPVisionModel", "Chinese-CLIP (CLIP copy)", T.ChineseCLIPVisionConfig, images(32), **VIT)
_register("CLIPSegVisionModel", "CLIPSeg (CLIP copy)", T.CLIPSegVisionConfig, images(32), **VIT)
_register("MetaClip2VisionModel", "MetaCLIP 2 (CLIP copy)", T.MetaClip2VisionConfig, images(32), **VIT)
_register("GitVisionModel", "GIT (CLIP copy)", T.GitVisionConfig, images(32), **VIT)
_register("Kosmos2VisionModel", "Kosmos-2 (CLIP copy)", T.Kosmos2VisionConfig, images(32),
          model_cls=Kosmos2VisionModel, **VIT)
_register("OwlViTVisionModel", "OWL-ViT (CLIP copy)", T.OwlViTVisionConfig, images(32), **VIT)
_register("Blip2VisionModel", "BLIP-2 (BLIP copy)", T.Blip2VisionConfig, images(32), **VIT)
_register("InstructBlipVisionModel", "InstructBLIP (BLIP copy)", T.InstructBlipVisionConfig, images(32), **VIT)
_register("InstructBlipVideoVisionModel", "InstructBLIP-Video (BLIP copy)", T.InstructBlipVideoVisionConfig,
          images(32), **VIT)
_register("FlavaImageModel", "FLAVA image (ViT copy)", T.FlavaImageConfig, images(32), **VIT)
_register("Idefics2VisionTransformer", "Idefics2 (SigLIP copy)", T.Idefics2VisionConfig, images(32),
          model_cls=Idefics2VisionTransformer, **VIT)
_register("Idefics3VisionTransformer", "Idefics3 (SigLIP copy)", T.Idefics3VisionConfig, images(32), **VIT)
_register("SmolVLMVisionTransformer", "SmolVLM (SigLIP copy)", T.SmolVLMVisionConfig, images(32), **VIT)
_register("Phi4MultimodalVisionModel", "Phi-4-multimodal (SigLIP copy)", T.Phi4MultimodalVisionConfig,
          images(32), **VIT, crop_size=32)
SAM_VIT = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4, image_size=64,
               patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64)
_register("SamHQVisionModel", "SAM-HQ (SAM copy)", T.SamHQVisionConfig, images(64), **SAM_VIT)
_register("GotOcr2VisionEncoder", "GOT-OCR2 vision (SAM copy)", T.GotOcr2VisionConfig, images(64),
          model_cls=GotOcr2VisionEncoder, **SAM_VIT)
_register("SLANeXtVisionEncoder", "SLANeXt vision (SAM copy)", T.SLANeXtVisionConfig, images(64),
          model_cls=SLANeXtVisionEncoder, **SAM_VIT)

# --------------------------------------------------------------------------- other standalone vision encoders
_register("BridgeTowerVisionModel", "BridgeTower (CLIP with nn.MultiheadAttention, hidden//64 heads)",
          T.BridgeTowerVisionConfig, images(32), model_cls=BridgeTowerVisionModel, hidden_size=64,
          num_hidden_layers=2, image_size=32, patch_size=4)
_register("MLCDVisionModel", "MLCD (CLIP + 2D RoPE)", T.MLCDVisionConfig, images(32), **VIT)
_register("InternVLVisionModel", "InternViT", T.InternVLVisionConfig, images(32),
          **{**VIT, "image_size": [32, 32], "patch_size": [4, 4]})
_register("JanusVisionModel", "Janus (SigLIP-like)", T.JanusVisionConfig, images(32), hidden_size=32,
          num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0, image_size=32, patch_size=4,
          projection_dim=32, num_image_tokens=64)
_register("Ovis2VisionModel", "Ovis2 (AIMv2-like + visual tokenizer)", T.Ovis2VisionConfig,
          images(32), model_cls=Ovis2VisionModel, **VIT, vocab_size=64)
_register("PixtralVisionModel", "Pixtral (2D RoPE, block-diagonal mask)", T.PixtralVisionConfig,
          pixtral_images(32), **VIT)
# Llama 4: the pixel-shuffle adapter sees hidden/ratio**2 = 128 features, which must equal intermediate_size
_register("Llama4VisionModel", "Llama 4 vision (2D RoPE + pixel shuffle)", T.Llama4VisionConfig, images(32),
          hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
          patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
_register("MllamaVisionModel", "Mllama (tiled, local + global layers)", T.MllamaVisionConfig,
          mllama_tiles(32, 2), hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
          intermediate_size=37, vision_output_dim=64, image_size=32, patch_size=4, max_num_tiles=2,
          intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2]])
_register("Gemma4VisionModel", "Gemma 4 vision (2D RoPE, pooled)", T.Gemma4VisionConfig, gemma4_patches(9, 4),
          hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
          head_dim=8, patch_size=4, pooling_kernel_size=3, position_embedding_size=64)
_register("Kosmos2_5VisionModel", "Kosmos-2.5 (Pix2Struct-like)", T.Kosmos2_5VisionConfig,
          pix2struct_patches(8, 4), model_cls=Kosmos2_5VisionModel, hidden_size=32, patch_embed_hidden_size=48,
          intermediate_size=37, head_dim=8, num_hidden_layers=2, num_attention_heads=4, max_num_patches=64)
_register("MgpstrModel", "MGP-STR (scene-text ViT)", T.MgpstrConfig, images((32, 64)), image_size=[32, 64],
          patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0,
          max_token_length=8)
_register("Tipsv2VisionModel", "TIPSv2 (DINOv2-like)", T.Tipsv2VisionConfig, images(32), **DINO)
_register("PixioModel", "Pixio (ViT, multi-CLS)", T.PixioConfig, images(32), **DINO, n_cls_tokens=2)
_register("RadioModel", "RADIO (CPE ViT, cls + registers)", T.RadioConfig, images(32),
          **{**DINO, "mlp_ratio": 2.0}, max_img_size=64,
          num_cls_tokens=2, num_registers=2)
_register("Sapiens2Model", "Sapiens2 (DINOv3-like, GQA, windowed middle layers)", T.Sapiens2Config, images(32),
          hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_attention_heads=2, image_size=32, patch_size=4, num_register_tokens=2,
          num_first_full_attention_layers=1, num_last_full_attention_layers=1)
_register("Sam3ViTModel", "SAM 3 ViT (windowed + RoPE)", T.Sam3ViTConfig, images(64), hidden_size=32,
          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
          window_size=4, global_attn_indexes=[1], pretrain_image_size=32)
# a global block must not open a stage (its window size 0 is divided by the query stride there)
_register("Sam2HieraDetModel", "SAM 2 Hiera-Det", T.Sam2HieraDetConfig, images(64), hidden_size=8,
          num_attention_heads=1, image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
          embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
          window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
          window_positional_embedding_background_size=[4, 4])
_register("LwDetrViTBackbone", "LW-DETR ViT (windowed)", T.LwDetrViTConfig, images(32), hidden_size=32,
          num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, pretrain_image_size=32,
          patch_size=4, window_block_indices=[0], num_windows=4, out_indices=[2])
_register("RfDetrDinov2Backbone", "RF-DETR DINOv2 (windowed)", T.RfDetrDinov2Config, images(32), **DINO,
          num_windows=2, out_indices=[2])
_register("Florence2VisionBackbone", "Florence-2 DaViT (window + channel attention)", T.Florence2VisionConfig,
          images(64), depths=[1, 1, 1, 1], embed_dim=[16, 32, 48, 64], num_heads=[1, 2, 3, 4],
          num_groups=[1, 2, 3, 4], window_size=2, drop_path_rate=0.0, projection_dim=32)
_register("SwiftFormerModel", "SwiftFormer (efficient additive attention)", T.SwiftFormerConfig, images(32),
          depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48])
_register("Swin2SRModel", "Swin2SR (Swin V2 for restoration)", T.Swin2SRConfig, images(32), image_size=32,
          embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, drop_path_rate=0.0)
_register("SegGptModel", "SegGPT (ViT with prompt pairs)", T.SegGptConfig, seggpt_inputs(32), hidden_size=32,
          num_hidden_layers=2, num_attention_heads=4, image_size=[64, 32], patch_size=4, mlp_dim=64,
          pretrain_image_size=32, decoder_hidden_size=16, merge_index=0, intermediate_hidden_state_indices=[0, 1],
          drop_path_rate=0.0)
_register("PerceiverForImageClassificationLearned", "Perceiver (latent cross-attention)", T.PerceiverConfig,
          images(32), num_latents=16, d_latents=32, d_model=512, num_blocks=1, num_self_attends_per_block=1,
          num_self_attention_heads=2, num_cross_attention_heads=1, image_size=32)
_register("ImageGPTModel", "ImageGPT (causal pixel-token GPT)", T.ImageGPTConfig, pixel_tokens(8, 513),
          vocab_size=513, n_positions=64, n_embd=32, n_layer=2, n_head=4)

_register("Step3p7VisionModel", "Step3.7 vision", T.Step3p7VisionConfig, images(32), hidden_size=32,
          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4,
          mlp_ratio=2.0, max_position_embeddings=64)
_register("QianfanOCRVisionModel", "Qianfan-OCR vision (InternViT copy)", T.QianfanOCRVisionConfig, images(32),
          **{**VIT, "image_size": [32, 32], "patch_size": [4, 4]}, drop_path_rate=0.0)
_register("PPFormulaNetVisionModel", "PP-FormulaNet vision (SAM-ViT-like)", T.PPFormulaNetVisionConfig,
          images(64), hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4, image_size=64,
          patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64, post_conv_in_channels=16,
          post_conv_out_channels=32, post_conv_mid_channels=16, decoder_hidden_size=32)
_register("GraniteDoclingVisionModel", "Granite-Docling vision (SigLIP-like)", T.GraniteDoclingVisionConfig,
          images(32), **VIT, out_hidden_size=32, scale_factor=2)
_register("Molmo2VisionModel", "Molmo2 vision (SigLIP-like, pre-patchified)", T.Molmo2VisionConfig, patches(8, 4),
          hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
          head_dim=8, image_size=[32, 32], patch_size=4, num_position_embeddings=64)

# --------------------------------------------------------------------------- video (extra)
_register("VJEPA2Model", "V-JEPA 2 (video, 3D RoPE)", T.VJEPA2Config, video_kw(4, 32, skip_predictor=True),
          patch_size=4, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=32, num_attention_heads=4,
          num_hidden_layers=2, mlp_ratio=2.0, num_pooler_layers=1, pred_hidden_size=32,
          pred_num_attention_heads=4, pred_num_hidden_layers=1, pred_num_mask_tokens=2)
_register("VideoPrismVisionModel", "VideoPrism (factorised space/time)", T.VideoPrismVisionConfig,
          video_kw(2, 32), image_size=32, num_frames=2, tubelet_size=[1, 4, 4], hidden_size=32,
          num_attention_heads=4, intermediate_size=37, num_spatial_layers=1, num_temporal_layers=1,
          num_auxiliary_layers=1)

# --------------------------------------------------------------------------- packed (NaViT-style) VLM towers
# input: every patch of every image in one sequence plus ``grid_thw``; the batch lives inside the sequence
QWEN = dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=4, in_channels=3, patch_size=4,
            spatial_merge_size=2, temporal_patch_size=1, out_hidden_size=32)
_register("Qwen2VisionTransformerPretrainedModel", "Qwen2-VL vision", T.Qwen2VLVisionConfig,
          packed_patches(8, 4), model_cls=Qwen2VisionTransformerPretrainedModel, depth=2, embed_dim=32,
          hidden_size=32, mlp_ratio=2, num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2,
          temporal_patch_size=1)
_register("Qwen2_5_VisionTransformerPretrainedModel", "Qwen2.5-VL vision (windowed + full)",
          T.Qwen2_5_VLVisionConfig, packed_patches(8, 4), **QWEN, window_size=16, fullatt_block_indexes=[1])
_register("Qwen3VLVisionModel", "Qwen3-VL vision (deepstack)", T.Qwen3VLVisionConfig, packed_patches(8, 4),
          **QWEN, num_position_embeddings=64, deepstack_visual_indexes=[0])
_register("Glm4vVisionModel", "GLM-4V vision", T.Glm4vVisionConfig, packed_patches(8, 4), **QWEN, image_size=32)
_register("PaddleOCRVisionModel", "PaddleOCR-VL vision (SigLIP + RoPE, packed)", T.PaddleOCRVisionConfig,
          paddle_patches(8, 4), **VIT)
_register("VideoLlama3VisionModel", "VideoLLaMA3 vision (SigLIP + RoPE, packed)", T.VideoLlama3VisionConfig,
          packed_patches(8, 4, merge_sizes=True), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
          num_attention_heads=4, patch_size=4)
_register("Qwen3VLMoeVisionModel", "Qwen3-VL-MoE vision (Qwen3-VL copy)", T.Qwen3VLMoeVisionConfig,
          packed_patches(8, 4), **QWEN, num_position_embeddings=64, deepstack_visual_indexes=[0])
_register("Qwen2_5OmniVisionEncoder", "Qwen2.5-Omni vision (Qwen2.5-VL copy)", T.Qwen2_5OmniVisionEncoderConfig,
          packed_patches(8, 4), model_cls=Qwen2_5OmniVisionEncoder, **QWEN, window_size=16,
          fullatt_block_indexes=[1])
_register("Qwen3OmniMoeVisionEncoder", "Qwen3-Omni-MoE vision (Qwen3-VL copy)", T.Qwen3OmniMoeVisionEncoderConfig,
          packed_patches(8, 4), model_cls=Qwen3OmniMoeVisionEncoder, **QWEN, num_position_embeddings=64,
          deepstack_visual_indexes=[0])
_register("Qwen3_5VisionModel", "Qwen3.5 vision (Qwen3-VL copy)", T.Qwen3_5VisionConfig, packed_patches(8, 4),
          **QWEN, num_position_embeddings=64)
_register("Qwen3_5MoeVisionModel", "Qwen3.5-MoE vision (Qwen3-VL copy)", T.Qwen3_5MoeVisionConfig,
          packed_patches(8, 4), **QWEN, num_position_embeddings=64)
_register("Qwen4ExpVisionModel", "Qwen4-Exp vision (Qwen3-VL copy)", T.Qwen4ExpVisionConfig, packed_patches(8, 4),
          **QWEN, num_position_embeddings=64)
_register("CohereCompassVisionModel", "Cohere Compass vision (Qwen3-VL copy)", T.CohereCompassVisionConfig,
          packed_patches(8, 4), **QWEN, num_position_embeddings=64, deepstack_visual_indexes=[0])
_register("Exaone4_5_VisionModel", "EXAONE 4.5 vision (Qwen2.5-VL copy, GQA)", T.Exaone4_5_VisionConfig,
          packed_patches(8, 4), **QWEN, window_size=16, fullatt_block_indexes=[1], num_key_value_heads=2)
_register("Glm4vMoeVisionModel", "GLM-4V-MoE vision (GLM-4V copy)", T.Glm4vMoeVisionConfig, packed_patches(8, 4),
          **QWEN, image_size=32)
_register("GlmOcrVisionModel", "GLM-OCR vision (GLM-4V copy)", T.GlmOcrVisionConfig, packed_patches(8, 4),
          **QWEN, image_size=32)
_register("Glm5NextVisionModel", "GLM-5-Next vision (GLM-4V copy)", T.Glm5NextVisionConfig, packed_patches(8, 4),
          **QWEN, image_size=32, projection_intermediate_size=64)
_register("Ernie4_5_VLMoeVisionTransformerPretrainedModel", "ERNIE 4.5 VL vision (Qwen2-VL-like)",
          T.Ernie4_5_VLMoeVisionConfig, packed_patches(8, 4), depth=2, hidden_size=32, intermediate_size=37,
          num_heads=4, in_channels=3, patch_size=4, spatial_merge_size=2)

# packed towers whose first input is called ``pixel_values`` (same packed layout as above)
_register("Ovis2_5VisionModel", "Ovis2.5 vision (SigLIP2 NaViT + windows, packed)", T.Ovis2_5VisionConfig,
          packed_patches(8, 4), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
          patch_size=4, image_size=32, window_size=16, vocab_size=64, max_position_embeddings=64)
_register("Cosmos3EdgeVisionModel", "Cosmos3-Edge vision (SigLIP2-like, packed)", T.Cosmos3EdgeVisionConfig,
          packed_patches(8, 4), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
          patch_size=4, num_patches=64)
_register("Dots3NoteVisionModel", "dots3 note vision (packed, MoE MLP)", T.Dots3NoteVisionConfig,
          packed_patches(8, 4), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
          patch_size=4, moe_intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, adapter_in_dim=32,
          adapter_out_dim=32, pyramid_num_routed=[-1, 4])  # layer 0 dense, layer 1 with 4 experts
_register("GlmImageVisionModel", "GLM-Image vision (packed)", T.GlmImageVisionConfig, packed_patches(8, 4), depth=2,
          hidden_size=32, num_heads=4, image_size=32, patch_size=4, intermediate_size=37)
_register("HYV4VLVisionModel", "HY-V4-VL vision (packed)", T.HYV4VLVisionConfig, packed_patches(8, 4),
          hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, out_hidden_size=32,
          patch_size=4, max_image_size=64)
_register("HunYuanVLVisionTransformer", "HunYuan-VL vision (packed)", T.HunYuanVLVisionConfig, packed_patches(8, 4),
          hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, out_hidden_size=32,
          patch_size=4, max_image_size=64, min_image_size=16, text_hidden_size=32)
_register("Kimi_K25VisionModel", "Kimi-K2.5 MoonViT (packed)", T.Kimi_K25VisionConfig, packed_patch_images(8, 4),
          patch_size=4, pos_emb_height=8, pos_emb_width=8, pos_emb_time=2, num_attention_heads=4,
          num_hidden_layers=2, hidden_size=32, intermediate_size=37)
_register("Lfm3VlVisionModel", "LFM3-VL vision (packed, GQA)", T.Lfm3VlVisionConfig, packed_patches(8, 4),
          hidden_size=32, intermediate_size=37, patch_size=4, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, temporal_patch_size=1)
_register("LlavaOnevision15VisionModel", "LLaVA-OneVision-1.5 RiceViT (packed)", T.LlavaOnevision15VisionConfig,
          packed_patches(8, 4), depth=2, hidden_size=32, intermediate_size=37, num_heads=4, patch_size=4,
          out_hidden_size=32)
_register("MiniMaxM3VLVisionModel", "MiniMax-M3-VL vision (packed)", T.MiniMaxM3VLVisionConfig, packed_patches(8, 4),
          hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
          patch_size=4, temporal_patch_size=1)
_register("MuseGlimmerVisionModel", "Muse-Glimmer vision (packed)", T.MuseGlimmerVisionConfig, packed_patches(8, 4),
          patch_size=4, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4, num_hidden_layers=2,
          hidden_size=32, intermediate_size=37, patch_temporal=1, max_position_embeddings=64)
_register("MuseSparkVisionModel", "Muse-Spark vision (Muse-Glimmer copy, packed)", T.MuseSparkVisionConfig,
          packed_patches(8, 4), patch_size=4, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4,
          num_hidden_layers=2, hidden_size=32, intermediate_size=37, patch_temporal=1, max_position_embeddings=64)
_register("Inkling2VisionModel", "Inkling2 vision (packed, one pixel block per LM token)", T.Inkling2VisionConfig,
          inkling2_tokens(8, 4), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
          posemb_grid_size=8, projection_hidden_dim=32, text_hidden_size=32)
_register("MiniCPMV4_7VisionModel", "MiniCPM-V 4.7 vision (SigLIP + window merger, packed strip)",
          T.MiniCPMV4_7VisionConfig, minicpm_strip(8, 4), **VIT, insert_layer_id=1)
_register("MiniCPMV4_6VisionModel", "MiniCPM-V 4.6 vision (MiniCPM-V copy, packed strip)",
          T.MiniCPMV4_6VisionConfig, minicpm_strip(8, 4), model_cls=MiniCPMV4_6VisionModel, **VIT,
          insert_layer_id=1)
_register("MiniCPMOcrVisionModel", "MiniCPM-OCR vision (MiniCPM-V copy, packed strip)", T.MiniCPMOcrVisionConfig,
          minicpm_strip(8, 4), **VIT, insert_layer_id=1)

# --------------------------------------------------------------------------- composite encoders (several ViTs inside)
SAM_SMALL = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                 patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64, downsample_channels=[32, 64])
QWEN2_SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=16)
_register("DeepseekOcr2VisionModel", "DeepSeek-OCR-2 vision (SAM ViT -> Qwen2 query encoder)",
          T.DeepseekOcr2VisionConfig, images(64), sam_config=SAM_SMALL, encoder_config=QWEN2_SMALL)
_register("UnlimitedOcrVisionModel", "Unlimited-OCR vision (SAM ViT -> Qwen2 query encoder)",
          T.UnlimitedOcrVisionConfig, images(64), sam_config=SAM_SMALL, encoder_config=QWEN2_SMALL)
DEPTHPRO_VIT = dict(model_type="dinov2", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, patch_size=4,
                    image_size=16, mlp_ratio=2)
_register("DepthProModel", "DepthPro (multi-scale DINOv2 patch + image encoders)", T.DepthProConfig, images(32),
          patch_size=16, fusion_hidden_size=16, intermediate_hook_ids=[0], intermediate_feature_dims=[8],
          scaled_images_ratios=[0.5, 1.0], scaled_images_overlap_ratios=[0.0, 0.25],
          scaled_images_feature_dims=[16, 16], image_model_config=DEPTHPRO_VIT, patch_model_config=DEPTHPRO_VIT,
          fov_model_config=DEPTHPRO_VIT)

# --------------------------------------------------------------------------- groups
_PACKED_INPUTS = {"packed_patches", "packed_patch_images", "paddle_patches", "inkling2_tokens", "minicpm_strip"}
PACKED = {name for name, (_, make) in HF.items() if make.__qualname__.split(".")[0] in _PACKED_INPUTS}
CONTROLS = {"ConvNextModel", "FocalNetModel"}

# --------------------------------------------------------------------------- families left out, and why
_TOWER = "vision tower built with AutoModel from another family's config (covered by that tower's entry)"
SKIPPED = {
    # not in transformers 5.25
    "EfficientFormer, ViTHybrid, Nat, VAN, TVLT": "not in transformers 5.25: no model directory, no exported class, "
                                                  "and models/deprecated/ is empty (Dinat is still there)",
    # missing optional dependency (the project venv is left untouched)
    "Dinat (DinatModel)": "needs natten (neighbourhood-attention kernels); not installed, raises ImportError at init",
    "EoMT (EomtForUniversalSegmentation)": "needs scipy: its Hungarian-matching loss is built in __init__",
    "EoMT-DINOv3 (EomtDinov3ForUniversalSegmentation)": "needs scipy (loss built in __init__)",
    "VidEoMT (VideomtForUniversalSegmentation)": "needs scipy (loss built in __init__)",
    "Inkling (InklingVisionModel)": "needs scipy (linear_sum_assignment when planning output scales in __init__)",
    # no attention in the image encoder
    "ResNet, RegNet, BiT, EfficientNet, ALIGN vision, MobileNetV1/V2, ConvNeXtV2, DINOv3-ConvNeXt, PoolFormer, "
    "HGNetV2, TextNet, PP-LCNet v1/v3/v4, SLANet, UVDoc, TVP (ResNet vision), SuperPoint":
        "convolutional / pooling backbones, no attention (ConvNext and FocalNet are kept as controls)",
    "EdgeTAM, EdgeTAM-video": "image encoder is timm RepViT (convolutional); memory attention only in the tracker",
    "Chameleon, Emu3, Apertus-1.5 vision tokenizer": "VQ-VAE image tokenizers (conv encoder), not patch encoders",
    "Gemma3n vision": "timm MobileNetV5 through TimmWrapperModel, whose key is taken by the Perception Encoder "
                      "entry (TimmWrapperConfig(architecture='mobilenetv5_300m_enc') builds it)",
    "Perception-LM, PE-Video, PE-Audio-Video": "use timm's Perception Encoder through TimmWrapper (TimmWrapperModel)",
    # heads / composites over encoders that have an entry
    "DepthAnything, PromptDepthAnything, ZoeDepth, UperNet, ViTMatte, ViTPose, Tipsv2-DPT, CHMv2, "
    "Mask2Former, MaskFormer, OneFormer": "task heads over backbones that already have an entry",
    "SAM / SAM-HQ / SAM 2 / SAM 3 full models and trackers, SAM3-lite-text":
        "prompt encoders, mask decoders and memory attention around image encoders that have an entry",
    "Conditional-DETR, DAB-DETR, Deformable-DETR, D-FINE, DEIMv2, RT-DETR v1/v2, Table-Transformer, Grounding-DINO, "
    "MM-Grounding-DINO, OmDet-Turbo, PP-DocLayout v2/v3/v4, LW-DETR / RF-DETR detectors":
        "DETR-style detectors (DetrModel is the representative; LW-DETR / RF-DETR backbones have entries)",
    "VisionEncoderDecoder, VisionTextDualEncoder, TrOCR, TimmBackbone": "generic wrappers / text decoders",
    # VLM wrappers
    "LLaVA (+NeXT, NeXT-Video, OneVision), VipLlava, Video-LLaVA, PaliGemma, Pi0, Pi0.5, Gemma3, ShieldGemma2, "
    "T5Gemma2, Mistral3, Mistral-Large-4, Aya Vision, Cohere2 Vision, FastVLM, LightOnOCR, Granite4 Vision, "
    "ColPali, ColQwen2, ColModernVBert, ModernVBert, UltraVBert, Aria, GLM-4.6V, HyperCLOVAX-Vision-V2, LFM2-VL, "
    "DeepSeek-VL (+Hybrid), Cosmos3-Omni, Nemotron-H-Omni, DiffusionGemma, EmbeddingGemma2, Inkling2-Loop": _TOWER,
    "Idefics (v1)": "CLIP-copy vision transformer with no standalone model class",
    # not a separate image encoder
    "ViLT, LayoutLMv3, UDOP, NeoMME": "single-stream multimodal encoders that need text ids with the image patches",
    "Fuyu, Gemma4-Unified": "image patches are linearly projected straight into the language model",
    "SuperGlue, LightGlue, EfficientLoFTR": "keypoint matchers over image pairs (attention over keypoints)",
    "PP-OCRv5/v6 recognition and detection": "CNN backbones; the text-line recognisers add a small SVTR attention "
                                              "neck on the CNN feature map",
}
