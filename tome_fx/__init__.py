"""tome_fx: Token Merging (Bolya et al., ICLR 2023) as a torch.fx graph pass."""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .api import ToMeModel, TokenState, transform  # noqa: E402
from .errors import UnsupportedModelError  # noqa: E402
from .schedule import resolve_schedule  # noqa: E402

__all__ = ["ToMeModel", "TokenState", "UnsupportedModelError", "resolve_schedule", "transform"]
__version__ = "0.1.0"
