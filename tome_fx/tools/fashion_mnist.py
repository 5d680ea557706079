"""The Fashion-MNIST reference model: real data and trained weights, offline.

ImageNet weights cannot be downloaded here, so accuracy-vs-r is measured on a small
timm ViT trained on Fashion-MNIST (Debian package ``dataset-fashion-mnist``). Its
28x28 images with 2x2 patches give 196 patch tokens plus a class token: the token
count of ViT-B/16 at 224, so merge schedules mean the same thing.

The patch embedding has a small convolutional stem (two 3x3 convs before the 2x2
patchify; Xiao et al. 2021, "Early convolutions help transformers see better"): a
plain ViT trained from scratch on 2 CPU cores stalled at 77% test accuracy after 4
epochs (of 10 planned), far from the 88% wanted. Tokens still tile the image in 2x2
patches; everything after the embedding is timm's VisionTransformer, untouched.
"""

from __future__ import annotations

import gzip
import pathlib

import torch
from torch import nn

DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
ASSETS = pathlib.Path(__file__).parent / "assets"
CHECKPOINT = ASSETS / "vit_fashion_mnist.safetensors"
ROPE_CHECKPOINT = ASSETS / "vit_rope_fashion_mnist.safetensors"
SAMVIT_CHECKPOINT = ASSETS / "samvit_fashion_mnist.safetensors"
SAMVIT_ABS_CHECKPOINT = ASSETS / "samvit_abs_fashion_mnist.safetensors"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# per-channel statistics of the training images, so inputs are roughly zero-mean unit-variance
MEAN, STD = 0.2860, 0.3530
MODEL_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=len(CLASSES),
                    embed_dim=64, depth=6, num_heads=2, mlp_ratio=3.0)
STEM_CHANNELS = 32


def _conv_stem_patch_embed(**kwargs) -> nn.Module:
    """timm's PatchEmbed whose ``proj`` is conv 3x3 -> conv 3x3 -> the patchify conv."""
    from timm.layers import PatchEmbed

    return _stemmed(PatchEmbed(**kwargs))


def _stemmed(embed: nn.Module) -> nn.Module:
    """timm's PatchEmbed with its ``proj`` made conv 3x3 -> conv 3x3 -> the patchify conv."""
    width, patch = embed.proj.out_channels, embed.patch_size

    def conv(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]

    embed.proj = nn.Sequential(*conv(embed.proj.in_channels, STEM_CHANNELS), *conv(STEM_CHANNELS, STEM_CHANNELS),
                               nn.Conv2d(STEM_CHANNELS, width, patch, patch))
    return embed


def create_model(checkpoint: str | pathlib.Path | None = CHECKPOINT, *, arch: str = "vit") -> torch.nn.Module:
    """The reference ViT (eval mode); weights from ``checkpoint`` unless it is None.

    ``arch="rope"`` is its rotary twin, for measuring how merged tokens should rotate:
    timm's RoPE ViT (naver-ai rope-vit, axial, no absolute position table) with the same
    stem, width, depth, heads and token count. ``arch="samvit"`` is its SAM-encoder twin,
    for measuring merged attention under decomposed relative positions: timm's SAM ViT
    (a [B, h, w, C] token grid, no class token; 8 x 8 windows over the 14 x 14 grid padded
    to 16 x 16, as SAM pads 64 to 70; global attention in blocks 2 and 5; relative positions
    and no absolute table, so positions come from the rule under test alone; a conv neck
    and an average-pooled head) with the same stem, width, depth and heads.
    ``arch="samvit_abs"`` is the same SAM encoder with an absolute position table instead of
    relative positions: the reference beside which the relative-position rules are judged.
    """
    import timm
    from safetensors.torch import load_file

    cfg = dict(input_size=(1, 28, 28), mean=(MEAN,), std=(STD,), num_classes=len(CLASSES))
    if arch == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_layer=_conv_stem_patch_embed,
                                  pretrained_cfg_overlay=cfg, **MODEL_KWARGS)
    elif arch == "rope":
        model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, pretrained_cfg_overlay=cfg,
                                  **MODEL_KWARGS)
        _stemmed(model.patch_embed)
    elif arch in ("samvit", "samvit_abs"):
        from timm.models.vision_transformer_sam import VisionTransformerSAM

        relative = arch == "samvit"
        model = VisionTransformerSAM(**MODEL_KWARGS, use_abs_pos=not relative, use_rel_pos=relative, window_size=8,
                                     global_attn_indexes=(2, 5), neck_chans=64, global_pool="avg")
        model.pretrained_cfg = cfg
        _stemmed(model.patch_embed)
    else:
        raise ValueError(f"arch is 'vit', 'rope', 'samvit' or 'samvit_abs', not {arch!r}")
    if checkpoint is not None:
        path = pathlib.Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"no reference checkpoint at {path}; train one with "
                "`python benchmarks/train_fashion_mnist.py` or pass the file you have")
        model.load_state_dict(load_file(str(path)))
    return model.eval()


def _read_idx(path: pathlib.Path) -> torch.Tensor:
    """An idx(.gz) file (the MNIST format) as a uint8 tensor of its stated shape."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_split(split: str, data_dir: str | pathlib.Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 28, 28] normalised float32, labels [N] int64) of ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = pathlib.Path(data_dir)
    images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass the folder holding the idx files")
    images = _read_idx(images_file).unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").long()
    return images, labels
