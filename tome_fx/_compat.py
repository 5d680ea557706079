"""One guarded place for environment quirks.

The PyPI torchvision wheel is built against CUDA. Next to a CPU-only torch its
C++ extension fails to load, and ``import torchvision`` (so ``import timm``)
then dies in ``torchvision/_meta_registrations.py`` with
``operator torchvision::nms does not exist``. Only the *schemas* of ``nms`` and
``qnms`` are needed for that import to succeed; no kernel is registered, so a
real call still fails loudly. Where the extension loads, this does nothing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library.Library alive (dropping it removes the schemas)


def _has_schema(name: str) -> bool:
    return torch._C._dispatch_has_kernel(f"torchvision::{name}") or bool(
        torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")
    )


def _extension_loads(package_dir: pathlib.Path) -> bool:
    for lib in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work beside a CPU-only torch (idempotent)."""
    global _library
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if not missing or _extension_loads(pathlib.Path(spec.submodule_search_locations[0])):
        return
    _library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _library.define(_SCHEMAS[name])
