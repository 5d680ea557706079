"""tome_fx: Token Merging (Bolya et al., ICLR 2023) as a torch.fx graph pass."""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .api import CompiledToMe, ToMeModel, TokenState, compile, transform  # noqa: E402
from .errors import UnsupportedModelError  # noqa: E402
from .schedule import resolve_schedule  # noqa: E402

__all__ = [
    "CompiledToMe",
    "ToMeModel",
    "TokenState",
    "UnsupportedModelError",
    "compile",
    "resolve_schedule",
    "transform",
]
__version__ = "0.1.0"
