"""The PyTorch references of the generation runtime's interface (`generation_runtime.py`): a Hugging Face causal
LM or translator in float32, eval mode, KV cache on, with the same calls as the deployed runners:
`generate(prompts, max_new_tokens)` (greedy, exactly that many new tokens: the end token is turned off, decoded like
any other token), `log_likelihood(blocks)` and
`translate(sources, ...)`. The report times the teacher and every PyTorch stage through these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["PYTORCH", "TorchCausalLM", "TorchTranslator"]

PYTORCH = "pytorch"


class _TorchReference:
    """A Hugging Face model in float32, eval mode, loaded from a folder (or given), with its parameter count."""

    runtime = PYTORCH
    auto_class = "AutoModelForCausalLM"

    def __init__(self, folder_or_model: str | os.PathLike | Any, *, num_threads: int | None = None):
        import transformers

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        model = folder_or_model
        if isinstance(folder_or_model, (str, os.PathLike)):
            self.path = Path(folder_or_model)
            model = getattr(transformers, self.auto_class).from_pretrained(self.path, dtype=torch.float32)
        self.model = model.eval()

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class TorchCausalLM(_TorchReference):
    """The PyTorch reference with the same calls (float32, eval mode, KV cache on)."""

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        lengths = {len(prompt) for prompt in prompts}
        if len(lengths) != 1:
            raise ValueError(
                f"prompts of one call must have one length (no padding), got lengths {sorted(lengths)}."
            )
        input_ids = torch.tensor([list(prompt) for prompt in prompts], dtype=torch.long)
        config = self.model.generation_config
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=[],  # no end token: exactly max_new_tokens, with no logits processor added to force it
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        )
        return output[:, input_ids.shape[1] :].tolist()

    @torch.inference_mode()
    def log_likelihood(self, blocks: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[float, int]:
        total, count = 0.0, 0
        for start in range(0, len(blocks), batch_size):
            chunk = [list(block) for block in blocks[start : start + batch_size]]
            # blocks of one length batch together; others one by one
            rows = [chunk] if len({len(block) for block in chunk}) == 1 else [[block] for block in chunk]
            for row in rows:
                ids = torch.tensor(row, dtype=torch.long)
                logits = self.model(input_ids=ids).logits[:, :-1].float()  # (batch, seq - 1, vocab)
                log_probs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])
                total += float(log_probs.sum())
                count += int(ids[:, 1:].numel())
        return total, count


class TorchTranslator(_TorchReference):
    """The PyTorch reference translator (float32, eval mode) with `CTranslate2Translator`'s call."""

    auto_class = "AutoModelForSeq2SeqLM"

    @torch.inference_mode()
    def translate(
        self, sources: Sequence[Sequence[int]], *, max_new_tokens: int = 128, num_beams: int = 1
    ) -> list[list[int]]:
        config = self.model.config
        pad = config.pad_token_id
        width = max(len(source) for source in sources)
        input_ids = torch.full((len(sources), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, source in enumerate(sources):
            input_ids[row, : len(source)] = torch.tensor(list(source))
            attention_mask[row, : len(source)] = 1
        # As the deployed runtime decodes: a row cut by the length limit is not given a forced end token.
        forced_eos = self.model.generation_config.forced_eos_token_id
        self.model.generation_config.forced_eos_token_id = None
        try:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
            )
        finally:
            self.model.generation_config.forced_eos_token_id = forced_eos
        special = {pad, config.eos_token_id, config.decoder_start_token_id}
        return [[int(t) for t in row if int(t) not in special] for row in output.tolist()]

    def generate(self, sources: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """`translate` greedily (the call the speed and memory measurements make)."""
        return self.translate(sources, max_new_tokens=max_new_tokens)
