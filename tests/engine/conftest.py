"""The tiny pipeline's engine under both resumable schedulers, and a UNet call counter."""

from __future__ import annotations

import pytest
import torch

from workers.builtin_models import build_tiny_pipeline
from workers.engine import Engine


@pytest.fixture(scope="module", params=["ddim", "euler"])
def engine(request) -> Engine:
    return Engine(build_tiny_pipeline(), request.param, torch.device("cpu"), "tiny (test)")


@pytest.fixture()
def unet_calls(engine: Engine):
    calls: list[int] = []
    handle = engine.pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()
