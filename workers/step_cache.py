"""The UNet run in two parts, so a step can reuse the deep features of an earlier one.

DeepCache (Ma et al., CVPR'24) on SD's UNet: the deep part (down blocks 1.., mid block, up
blocks ..-2) is what changes little between adjacent steps; the shallow part (conv_in, the
first down block, the last up block, conv_out) runs every step on the full-resolution skip
connections. We write this piece rather than take the ``deepcache`` package: that one
patches the stock pipeline's call and its UNet's forward for one whole batch at one step,
while our loop batches jobs at different steps, where some rows of a UNet call refresh their
features and others reuse theirs (diffusers' own cache hooks attach to transformer models
only). The row split is ours; each block runs as diffusers' UNet2DConditionModel.forward
runs it (for the plain text-to-image configuration, checked on load).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from core.errors import ModelLoadError
from workers.controlnet import Residuals

# Configuration fields whose non-default value adds inputs our forward does not pass.
_PLAIN = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim_type": None,
          "time_cond_proj_dim": None, "center_input_sample": False}


class SplitUNet:
    """``unet`` run with rows either whole (their deep features are returned) or shallow
    (their deep features are given)."""

    def __init__(self, unet: UNet2DConditionModel,
                 narrow: Callable[[torch.Tensor], AbstractContextManager[None]] | None = None
                 ) -> None:
        """``narrow``: entered around the deep part, which runs the whole rows only (how
        per-row LoRAs, workers.lora, follow the rows)."""
        odd = {name: unet.config[name] for name, plain in _PLAIN.items()
               if unet.config.get(name, plain) != plain}
        if odd or len(unet.down_blocks) < 2:
            raise ModelLoadError(f"the step cache runs plain text-to-image UNets only "
                                 f"(this one has {odd or 'one down block'})")
        self.unet = unet
        self.narrow = narrow or (lambda _: contextlib.nullcontext())
        # the skip connections the last up block takes: conv_in's and the first block's
        self.skips = len(unet.up_blocks[-1].resnets)

    @staticmethod
    def _block(block: Any, text: torch.Tensor, **inputs: Any) -> Any:
        if getattr(block, "has_cross_attention", False):
            return block(**inputs, encoder_hidden_states=text)
        return block(**inputs)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                 whole: torch.Tensor, deep: torch.Tensor | None,
                 residuals: Callable[[], Residuals] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise prediction, deep features) for every row. ``whole`` (bool per row): the
        rows that run the whole UNet; ``deep``: the cached features of the others, in order
        (None when every row is whole). ``residuals``: ControlNet residuals for every row,
        added to the skip connections and the mid block as diffusers' UNet adds them; asked
        for only once the down blocks have run, so a ControlNet can run meanwhile."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        hidden, res = self._block(unet.down_blocks[0], text, hidden_states=hidden, temb=emb)
        skips += res
        features = torch.empty((0,), device=sample.device)
        if bool(whole.any()):
            with self.narrow(whole):
                features = self._deep(hidden[whole], tuple(s[whole] for s in skips),
                                      emb[whole], text[whole], sample.shape[-2:],
                                      residuals and (lambda: _rows(residuals(), whole)))
        if deep is not None:
            merged = torch.empty((len(whole), *deep.shape[1:]), dtype=deep.dtype,
                                 device=deep.device)
            merged[~whole] = deep
            if bool(whole.any()):
                merged[whole] = features
            features = merged
        if residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, residuals()[0]))
        hidden = self._block(unet.up_blocks[-1], text, hidden_states=features, temb=emb,
                             res_hidden_states_tuple=skips[:self.skips])
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden), features

    def _deep(self, hidden: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor,
              text: torch.Tensor, size: torch.Size,
              residuals: Callable[[], Residuals] | None) -> torch.Tensor:
        """The deep part: down blocks 1.., mid, up blocks ..-2; its output is the last up
        block's input."""
        unet = self.unet
        for block in unet.down_blocks[1:]:
            hidden, res = self._block(block, text, hidden_states=hidden, temb=emb)
            skips += res
        added = residuals() if residuals is not None else None
        if added is not None:
            skips = tuple(s + r for s, r in zip(skips, added[0]))
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb, encoder_hidden_states=text)
            else:
                hidden = unet.mid_block(hidden, emb)
        if added is not None:
            hidden = hidden + added[1]
        odd_size = any(dim % 2 ** unet.num_upsamplers for dim in size)
        for block in unet.up_blocks[:-1]:
            skips, res = skips[:-len(block.resnets)], skips[-len(block.resnets):]
            hidden = self._block(block, text, hidden_states=hidden, temb=emb,
                                 res_hidden_states_tuple=res,
                                 upsample_size=skips[-1].shape[2:] if odd_size else None)
        return hidden


def _rows(residuals: Residuals, keep: torch.Tensor) -> Residuals:
    down, mid = residuals
    return [r[keep] for r in down], mid[keep]
