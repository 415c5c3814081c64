"""Exponential moving average of model weights, with timm ``ModelEmaV3`` semantics.

When timm is installed the averaging is timm's own ``ModelEmaV3``; otherwise the same math
runs here (plain lerp; timm's stochastic rounding of bfloat16 EMA weights is timm-only).

Decay at optimizer step ``step`` (counting from 1 after ``update_after_step``):

    s = step - update_after_step - 1
    s <= 0                  -> 0.0   (the first update copies the weights)
    warmup                  -> clamp(1 - (1 + s / warmup_gamma) ** -warmup_power, min_decay, decay)
    otherwise               -> decay
    step is None            -> decay
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from scmc_runtime._optional import install_hint
from scmc_runtime.checkpoint import unwrap

__all__ = ["ModelEma"]


def _timm_model_ema_v3() -> Optional[type]:
    try:
        from timm.utils.model_ema import ModelEmaV3
    except ImportError:
        return None
    return ModelEmaV3


class ModelEma:
    """Averaged copy of a model, updated after each optimizer step.

    ``model`` may be wrapped in DDP and/or ``torch.compile``; the average is kept of the
    unwrapped module, so ``state_dict()`` keys have no ``module.``/``_orig_mod.`` prefixes.
    ``module`` is the averaged copy, in eval mode and without gradients: evaluate it directly.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        device: Optional[torch.device] = None,
        foreach: bool = True,
        exclude_buffers: bool = False,
        use_timm: Optional[bool] = None,
    ) -> None:
        source = unwrap(model)
        timm_class = _timm_model_ema_v3() if use_timm in (None, True) else None
        if use_timm and timm_class is None:
            raise ImportError(f"ModelEma(use_timm=True) needs timm: {install_hint('timm', 'timm')}")

        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.foreach = foreach
        self.exclude_buffers = exclude_buffers  # buffers (BatchNorm statistics) copied, not averaged
        self._timm: Any = None
        if timm_class is not None:
            self._timm = timm_class(
                source,
                decay=decay,
                min_decay=min_decay,
                update_after_step=update_after_step,
                use_warmup=warmup,
                warmup_gamma=warmup_gamma,
                warmup_power=warmup_power,
                device=device,
                foreach=foreach,
                exclude_buffers=exclude_buffers,
            )
            self.module: nn.Module = self._timm.module
        else:
            self.module = deepcopy(source)
            if device is not None:
                self.module.to(device=device)
                self.foreach = foreach and device == next(source.parameters()).device
        self.module.eval()
        self.module.requires_grad_(False)

    @property
    def backend(self) -> str:
        return "timm" if self._timm is not None else "torch"

    def get_decay(self, step: Optional[int] = None) -> float:
        if self._timm is not None:
            return self._timm.get_decay(step)
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(decay, self.decay), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        """Move the average towards ``model``'s current weights (call after ``optimizer.step()``)."""
        source = unwrap(model)
        if self._timm is not None:
            self._timm.update(source, step=step)
            return
        weight = 1.0 - self.get_decay(step)
        ema_values: List[torch.Tensor] = []
        model_values: List[torch.Tensor] = []
        buffers = {id(b) for b in self.module.buffers()} if self.exclude_buffers else set()
        for ema_v, model_v in zip(
            self.module.state_dict(keep_vars=True).values(), source.state_dict().values(), strict=True
        ):
            averaged = id(ema_v) not in buffers
            ema_v, model_v = ema_v.data, model_v.to(device=ema_v.device)
            if ema_v.is_floating_point() and averaged:
                ema_values.append(ema_v)
                model_values.append(model_v.to(dtype=ema_v.dtype))
            else:
                ema_v.copy_(model_v)  # integer buffers (e.g. BatchNorm's num_batches_tracked)
        if not ema_values:
            return
        if self.foreach:
            torch._foreach_lerp_(ema_values, model_values, weight=weight)
        else:
            for ema_v, model_v in zip(ema_values, model_values, strict=True):
                ema_v.lerp_(model_v, weight)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights, keyed like the unwrapped model's ``state_dict``."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict)
