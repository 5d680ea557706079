"""tome_fx: Token Merging (Bolya et al., ICLR 2023) as a torch.fx graph pass.

Layout: the core (``api``, ``merge``, ``schedule``, ``capture``, ``cost``, ``passes/``) imports
nothing from ``integrations/`` (per-model entry points) or ``tools/`` (CLI, demo, benchmarks,
reference models). This file is the package's front door: ``tome_fx.sd``, ``tome_fx.sam`` and
``tome_fx.vlm`` are the integrations under their public names.
"""

import sys

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .api import CompiledToMe, ToMeModel, TokenState, compile, transform  # noqa: E402
from .errors import UnsupportedModelError  # noqa: E402
from .local import LocalToMe  # noqa: E402
from .integrations import sam, sd, vlm  # noqa: E402
from .schedule import resolve_schedule  # noqa: E402

# `import tome_fx.sd` and `from tome_fx.sd import apply` find the integration under its public name
sys.modules.update({f"{__name__}.sd": sd, f"{__name__}.sam": sam, f"{__name__}.vlm": vlm})

__all__ = [
    "CompiledToMe",
    "LocalToMe",
    "ToMeModel",
    "TokenState",
    "UnsupportedModelError",
    "compile",
    "resolve_schedule",
    "sam",
    "sd",
    "transform",
    "vlm",
]
__version__ = "0.1.0"
