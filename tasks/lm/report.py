"""What the causal-LM report adds to the common one: greedy generations of teacher and student on validation
prompts, and forward throughput in tokens per second."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from hf_distill.tasks.common.generation_limits import max_positions, vocabulary_constraint
from hf_distill.tasks.lm.data import DataFormat, prompt_ids_of

logger = logging.get_logger(__name__)


def report_prompts(
    dataset: Dataset, data_format: DataFormat, count: int, prompt_tokens: int
) -> list[list[int]]:
    """Prompts for the report's generations: the prompts of prompt/completion rows, or the first `prompt_tokens`
    tokens of raw-text blocks."""
    prompts = []
    for row in islice(dataset.with_format(None), count):
        ids = (
            prompt_ids_of(row)
            if data_format.has_prompts
            else [int(t) for t in row["input_ids"][:prompt_tokens]]
        )
        if ids:
            prompts.append(ids)
    return prompts


def greedy_generations(
    model: Any, prompts: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[str]:
    """The greedy continuation of each prompt, decoded without special tokens (one prompt at a time: no padding).

    Only ids the tokenizer can decode are generated (a model padded past the tokenizer could pick others), and a
    prompt plus its continuation stays inside the model's position limit (fewer new tokens, with a warning)."""
    device = next(model.parameters()).device
    constraint = vocabulary_constraint(model, len(tokenizer))
    positions = max_positions(getattr(model, "config", None))
    was_training = model.training
    model.eval()
    texts = []
    warned = False
    try:
        with torch.no_grad():
            for prompt in prompts:
                new_tokens = max_new_tokens
                if positions is not None and len(prompt) + max_new_tokens > positions:
                    new_tokens = positions - len(prompt)
                    if not warned:
                        warned = True
                        logger.warning(
                            f"--report_max_new_tokens {max_new_tokens}: a report prompt of {len(prompt)} tokens "
                            f"plus that many tokens exceeds the model's {positions} positions; generating "
                            f"{max(new_tokens, 0)} tokens for it."
                        )
                    if new_tokens < 1:
                        texts.append("")
                        continue
                input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **constraint,
                )
                texts.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def tokens_per_second(
    latency_ms: Mapping[Any, float], make_inputs: Callable[[int], Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """Real (unpadded) tokens per second of a forward pass, per batch size, from the measured latencies."""
    rates = {}
    for batch_size, milliseconds in latency_ms.items():
        inputs = make_inputs(int(batch_size))
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        if milliseconds > 0:
            rates[str(int(batch_size))] = tokens * 1000.0 / milliseconds
    return rates


def generations_markdown(generations: Sequence[Mapping[str, str]]) -> str:
    lines = ["", "## Greedy generations on validation prompts", ""]
    for index, entry in enumerate(generations, start=1):
        lines.append(f"**Prompt {index}:** {entry['prompt']!r}")
        lines.append("")
        for name, text in entry.items():
            if name != "prompt":
                lines.append(f"- {name}: {text!r}")
        lines.append("")
    return "\n".join(lines)
