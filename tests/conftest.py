import os

import tome_fx  # noqa: F401  -- first: makes torchvision (and so timm) importable beside CPU torch

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(min(2, os.cpu_count() or 1))
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
