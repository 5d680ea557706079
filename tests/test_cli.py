"""The tome-fx command line on tiny models and data made in the test."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tome_fx
from tome_fx.tools import cli, fashion_mnist, visualize, zoo


@pytest.fixture(scope="module")
def fashion_checkpoint(tmp_path_factory):
    """Reference-model weights with a strongly biased head: every image is class 3."""
    torch.manual_seed(0)
    model = fashion_mnist.create_model(checkpoint=None)
    with torch.no_grad():
        model.head.bias.copy_(torch.arange(10) == 3).mul_(100)
    path = tmp_path_factory.mktemp("ckpt") / "fashion.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _image_folder(root, per_class=3):
    for label in range(10):
        folder = root / f"{label:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_eval_reports_original_and_tome_top1_on_an_image_folder(tmp_path, fashion_checkpoint, capsys):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "acc.json"
    cli.main(["eval", "--checkpoint", str(fashion_checkpoint), "--data", str(data), "--r", "8", "13,-1",
              "--batch", "7", "--workers", "2", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "on 30 images" in printed and "r=13,-1" in printed and "model alone" in printed
    assert "end-to-end" in printed and "waiting on the loader (2 workers)" in printed
    report = json.loads(out.read_text())
    # every image is predicted class 3 and 3 of the 30 images are in folder 03
    assert report["top1"] == pytest.approx({"original": 0.1, "r=8": 0.1, "r=13,-1": 0.1})
    # each model's own throughput is at least the end-to-end one, which also waits on the loader
    assert min(report["model_images_per_s"].values()) > report["end_to_end_images_per_s"] > 0


def test_eval_preprocesses_as_timm_and_torchvision_say_for_the_weights():
    """timm models get ``resolve_data_config``'s transform (resize, centre crop, normalise), torchvision
    models their weights' preset: not a plain resize of the whole image."""
    from timm.data import create_transform, resolve_data_config

    image = Image.fromarray(torch.randint(0, 256, (200, 300, 3), dtype=torch.uint8).numpy())
    loaded = zoo.load("deit_tiny_patch16_224")
    want = create_transform(**resolve_data_config({}, model=loaded.model))(image)
    assert want.shape == (3, 224, 224) and torch.equal(loaded.eval_transform()(image), want)
    assert not torch.allclose(loaded.preprocess(image), want)  # the crop matters
    assert zoo.load("tv:vit_b_16").eval_transform()(image).shape == (3, 224, 224)


def test_eval_without_images_says_what_layout_it_expects(tmp_path, fashion_checkpoint):
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        cli.main(["eval", "--checkpoint", str(fashion_checkpoint), "--data", str(tmp_path), "--quiet"])


def test_missing_weights_say_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_REACHABLE", {zoo._hub_host(): "no connection (test)"})  # never the network
    with pytest.raises(SystemExit, match="no reference checkpoint"):
        cli.main(["eval", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(tmp_path)])
    with pytest.raises(zoo.WeightsUnavailable, match="--checkpoint"):
        zoo.load("deit_tiny_patch16_224", pretrained=True)


def test_visualize_paints_each_group_in_its_mean_colour(tmp_path, fashion_checkpoint, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()).save(image)
    cli.main(["visualize", str(image), "--checkpoint", str(fashion_checkpoint), "--r", "16", "-o",
              str(tmp_path / "out.png")])
    assert "197 -> 101 tokens" in capsys.readouterr().out
    painted = Image.open(tmp_path / "out.png")
    assert painted.size == (2 * 28 * 8 + 8, 28 * 8)  # input and groups side by side, 8x upscaled


def test_paint_gives_one_colour_per_group_and_outlines_borders():
    pixels = torch.rand(3, 4, 4)
    groups = torch.tensor([[0, 0], [1, 0]])  # 2x2 patches of 2x2 pixels
    out = visualize.paint(pixels, groups)
    cells = groups.repeat_interleave(2, 0).repeat_interleave(2, 1)
    border = torch.zeros(4, 4, dtype=torch.bool)
    border[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    border[1:, :] |= cells[1:, :] != cells[:-1, :]
    assert torch.equal(out[:, border], torch.ones(3, int(border.sum())))
    for group in (0, 1):
        inside = (cells == group) & ~border
        mean = pixels[:, cells == group].mean(-1, keepdim=True)
        torch.testing.assert_close(out[:, inside], mean.expand(3, int(inside.sum())))


def test_patch_groups_follow_the_merges(fashion_checkpoint):
    fast = tome_fx.transform(fashion_mnist.create_model(fashion_checkpoint), 16)
    groups = visualize.patch_groups(fast, torch.randn(1, 28, 28))
    assert groups.shape == (14, 14)
    assert groups.unique().numel() == fast.token_counts[-1] - fast.plan.protected


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    cli.main(["bench", "--models", "fashion-vit", "--r", "8", "16", "--batch", "2", "--repeats", "2",
              "--merge-share", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| fashion-vit | eager | 2 | 16 | 101 |" in printed and "merge share: 1 - time(stand-in" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["schedule"]: row for row in report["rows"]}
    assert rows["0"]["speedup"] == 1.0 and rows["16"]["bound"] > rows["8"]["bound"] > 1
    assert rows["0"]["merge_share"] is None and all(-1 < rows[r]["merge_share"] < 1 for r in ("8", "16"))
    assert (tmp_path / "speedup.png").stat().st_size > 0 and (tmp_path / "bench.md").read_text().startswith("| model")


def test_bench_in_bfloat16_reports_the_fused_attention_kernel(tmp_path, capsys):
    """``--dtype`` moves model and inputs; each row names the attention kernels that ran, and the
    ToMe model's (a float bias for proportional attention) are fused ones, not the math fallback."""
    cli.main(["bench", "--models", "fashion-vit", "--r", "8", "--batch", "2", "--repeats", "1", "--dtype",
              "bfloat16", "--out", str(tmp_path)])
    assert "bfloat16" in capsys.readouterr().out
    rows = {row["schedule"]: row for row in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["8"]["dtype"] == "bfloat16" and rows["8"]["device"] == "cpu"
    assert rows["8"]["sdpa"] == "_scaled_dot_product_flash_attention_for_cpu x6", rows["8"]["sdpa"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_on_a_missing_gpu_says_so():
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        cli.main(["bench", "--models", "fashion-vit", "--device", "cuda", "--dtype", "float16"])


def test_bench_times_a_peer_beside_tome_fx():
    from tome_fx.tools import bench

    model = fashion_mnist.create_model(checkpoint=None)
    rows = bench.run("fashion-vit", model, (1, 28, 28), [0, 8], batch=2, mode="eager", repeats=1,
                     peers={"same": tome_fx.transform})
    assert [(row.label, row.impl) for row in rows] == [("0", "tome_fx"), ("8", "tome_fx"), ("8 (same)", "same")]
    assert rows[2].bound == rows[1].bound and rows[2].tokens_out == rows[1].tokens_out


def test_schedules_parse_as_the_help_says():
    assert cli.parse_schedule("13") == 13
    assert cli.parse_schedule("13,-1") == (13, -1.0)
    assert cli.parse_schedule("4/4/0") == [4, 4, 0]


def test_merge_stand_in_keeps_the_shapes_and_leaves_the_model_as_it_was():
    from tome_fx import merge
    from tome_fx.tools import bench

    fast = tome_fx.transform(fashion_mnist.create_model(checkpoint=None), 8)
    targets = [node.target for node in fast.graph_module.graph.nodes]
    stand_in = bench.without_merge_cost(fast)
    inputs = torch.randn(2, 1, 28, 28)
    (out, state), (want, want_state) = stand_in.forward_with_tokens(inputs), fast.forward_with_tokens(inputs)
    assert out.shape == want.shape and state.size.shape == want_state.size.shape
    assert stand_in(inputs).shape == fast(inputs).shape
    for graph_module in (stand_in.graph_module, stand_in.forward_graph_module):
        assert merge.tome_merge not in [node.target for node in graph_module.graph.nodes]
    assert [node.target for node in fast.graph_module.graph.nodes] == targets


def test_the_latency_peer_computes_the_same_tome_as_tome_fx():
    """``benchmarks/paper_tome.py`` (the official patch's algorithm, timed beside tome_fx) must
    merge the same tokens, or the latency comparison compares different work."""
    import pathlib
    import sys

    import timm

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    from paper_tome import paper_patch

    torch.manual_seed(0)
    for name in ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]:
        model = timm.create_model(name, img_size=64, depth=3).eval()
        torch.nn.init.normal_(model.head.weight)
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            want = tome_fx.transform(model, 4)(images)
            for sdpa in (False, True):
                torch.testing.assert_close(paper_patch(model, 4, sdpa)(images), want, rtol=1e-4, atol=1e-3)
            assert not torch.allclose(model(images), want, atol=1e-1)  # it merged
