"""How each micro-batch's loss terms are scaled so that the micro-batches of one optimizer step add up to the mean
over the whole accumulated (and, across processes, global) batch: the same update for batch 8 as for batch 4 with
2 accumulation steps.

Token-level sums follow the `Trainer`'s convention: divided by `num_items_in_batch`, the label tokens of the whole
accumulation window (all processes with `average_tokens_across_devices`), then multiplied by the number of
processes, because DDP averages gradients. Example-level losses are per-micro-batch means divided by the number of
accumulation steps. Hidden-state and attention terms are means over real (unpadded) tokens, rescaled by the real
tokens of the window, counted from the attention masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def normalise_sum(
    total: torch.Tensor,
    count: torch.Tensor | int,
    num_items_in_batch: torch.Tensor | int | None,
    *,
    token_level: bool,
    processes: int,
    accumulation_steps: int,
) -> torch.Tensor:
    """A micro-batch's summed loss over `count` items, scaled as the module docstring says.

    processes: the factor DDP's gradient averaging must be undone by (1 unless tokens are averaged across devices).
    """
    if token_level and num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1) * processes
    count = torch.as_tensor(count, device=total.device).clamp(min=1)
    return total / count / accumulation_steps


def window_token_counts(batches: Sequence[dict[str, Any]], device: Any, gather: Any = None) -> dict[str, Any]:
    """Real tokens of an accumulation window per mask key (attention_mask, decoder_attention_mask), summed over
    its micro-batches and, with `gather` (e.g. `accelerator.gather`), over processes."""
    counts = {}
    for key in ("attention_mask", "decoder_attention_mask"):
        if batches and all(key in batch for batch in batches):
            count = sum(batch[key].sum() for batch in batches).to(device)
            counts[key] = gather(count).sum() if gather is not None else count
    return counts
