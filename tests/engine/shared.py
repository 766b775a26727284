"""What the engine tests share: a step callback that does nothing, an image's pixels, and a
ControlNet for the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from workers.engine import Generation


def no_op(step: int, total: int) -> None:
    pass


def pixels(generation: Generation) -> np.ndarray:
    """The image as signed integers, so differences do not wrap."""
    return np.asarray(Image.open(io.BytesIO(generation.image_png)), dtype=np.int16)


def tiny_controlnet(unet: object, path: Path) -> Path:
    """A ControlNet made from the tiny UNet with its zero convolutions and control-image
    encoder randomised (so the control image has an effect), saved at ``path``."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            zero_conv.weight.normal_(0, 0.5)
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0, 0.3)
    controlnet.save_pretrained(path)
    return path
