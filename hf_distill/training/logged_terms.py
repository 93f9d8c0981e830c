"""The loss components (`ce_loss`, `kd_loss`, ...) logged beside `loss`: summed over the micro-batches of the
optimizer steps since the last log, then averaged per step and added to the `Trainer`'s logs, unrounded as `loss`
is (a KD term of 0.009 keeps its digits)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


class LoggedTerms:
    """Loss components waiting for the next `Trainer.log`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.start_step = 0

    def add(self, components: Mapping[str, torch.Tensor], global_step: int, scale: float = 1.0) -> None:
        """Adds one micro-batch's components (each already normalised over its accumulation window, or scaled by
        `scale` here, e.g. 1 / accumulation steps for per-micro-batch means)."""
        if not self.sums:
            self.start_step = global_step
        for name, value in components.items():
            value = value.detach().float() * scale
            self.sums[name] = self.sums.get(name, 0.0) + value

    def flush_into(
        self,
        logs: dict[str, float],
        global_step: int,
        reduce: Callable[..., Any] | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        """When `logs` is a training log (it has `loss`), adds each component's mean per optimizer step since the
        last log (averaged over processes with `reduce(tensor, reduction="mean")` when given) and starts over."""
        if "loss" not in logs or not self.sums:
            return
        steps = max(global_step - self.start_step, 1)
        for name in sorted(self.sums) if names is None else names:
            if name in self.sums:
                total = self.sums[name].reshape(1)
                if reduce is not None:
                    total = reduce(total, reduction="mean")
                logs[name] = float(total.item()) / steps
        self.sums = {}
