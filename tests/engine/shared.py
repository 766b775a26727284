"""What the engine and add-on tests share: a step callback that does nothing, an image's
pixels, a control image, and a ControlNet for the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quality.evaluator import png_pixels
from quality.placement import png
from workers.engine import Generation


def no_op(step: int, total: int) -> None:
    pass


def signed_pixels(image_png: bytes) -> np.ndarray:
    """A PNG's pixels as signed integers, so differences do not wrap."""
    return png_pixels(image_png).astype(np.int16)


def pixels(generation: Generation) -> np.ndarray:
    return signed_pixels(generation.image_png)


def square_png(x: int, size: int = 64) -> bytes:
    """A control image: a white square at column ``x`` on black."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[20:44, x:x + 24] = 255
    return png(image)


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
