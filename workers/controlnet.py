"""ControlNets served beside the base UNet: per UNet call, the controlled rows' residuals.

SwiftDiffusion (arXiv 2407.02031) runs the ControlNet in parallel with the base UNet rather
than before it: the UNet's input convolution and down blocks do not need the residuals (they
join the skip connections and the mid block), so both can run at once and meet before the
mid block. Here the branch runs inline before the UNet call, or (``parallel``) on a thread
of its own beside the down blocks. Beside pays off only where the UNet leaves compute idle:
on this 2-core CPU with one torch thread per call it cuts the ControlNet's added time by
three quarters, while giving both cores to one inline call is faster still
(bench/results/addons-cpu.json); on a GPU both threads queue on the device's default stream,
so a stream or a device of its own for the branch (SwiftDiffusion's setting) is what would
overlap them, and is not built. Rows without a ControlNet get zero residuals, so controlled
and plain jobs share a batch; each row's residuals are scaled by its job's scale.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from core.errors import ModelLoadError

Residuals = tuple[list[torch.Tensor], torch.Tensor]   # (down blocks' skips, mid block)
ControlledRows = list[tuple[list[int], str, torch.Tensor, float]]
"""Per controlled job: its rows in the UNet call, its ControlNet, image (1 x 3 x H x W in
[0, 1]) and scale."""


@dataclass(frozen=True)
class ControlConfig:
    """How a GPU worker serves ControlNets: where control images come from (an object key ->
    bytes), the ControlNets by name (diffusers directories, T2I_CONTROLNETS), and whether
    the branch runs beside the UNet (T2I_CONTROLNET_PARALLEL)."""

    fetch: Callable[[str], bytes]
    paths: dict[str, str]
    parallel: bool = False


def load_controlnets(paths: dict[str, str], device: torch.device,
                     dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from diffusers import ControlNetModel

    loaded = {}
    for name, path in paths.items():
        try:
            model = ControlNetModel.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load ControlNet {name!r} from {path!r}: {exc}") from exc
        loaded[name] = model.to(device).eval()
    return loaded


def control_image(data: bytes, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A stored control image (checked on submission) as 1 x 3 x H x W in [0, 1]."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, dtype)


class ControlBranch:
    def __init__(self, controlnets: dict[str, torch.nn.Module], parallel: bool) -> None:
        self.controlnets = controlnets
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="controlnet") if parallel else None

    def start(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
              controlled: ControlledRows) -> Callable[[], Residuals]:
        """Begin the residuals of this UNet call; the returned call gives them (waiting for
        the branch's thread when it runs beside the UNet)."""
        if self._pool is None:
            done = self._residuals(sample, timesteps, text, controlled)
            return lambda: done
        return self._pool.submit(self._residuals, sample, timesteps, text, controlled).result

    @torch.inference_mode()
    def _residuals(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                   controlled: ControlledRows) -> Residuals:
        down: list[torch.Tensor] = []
        mid = torch.empty(0)
        for name in dict.fromkeys(name for _, name, _, _ in controlled):
            mine = [(rows, image, scale) for rows, used, image, scale in controlled
                    if used == name]
            index = torch.tensor([row for rows, _, _ in mine for row in rows],
                                 device=sample.device)
            images = torch.cat([image.expand(len(rows), -1, -1, -1) for rows, image, _ in mine])
            scales = torch.tensor([scale for rows, _, scale in mine for _ in rows],
                                  device=sample.device, dtype=sample.dtype).view(-1, 1, 1, 1)
            skips, middle = self.controlnets[name](
                sample[index], timesteps[index], text[index], controlnet_cond=images,
                return_dict=False)
            if not down:
                down = [torch.zeros((len(sample), *s.shape[1:]), dtype=s.dtype,
                                    device=s.device) for s in skips]
                mid = torch.zeros((len(sample), *middle.shape[1:]), dtype=middle.dtype,
                                  device=middle.device)
            for full, part in zip(down, skips):
                full[index] = part * scales
            mid[index] = middle * scales
        return down, mid

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
