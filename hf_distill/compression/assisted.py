"""Assisted (speculative) decoding with a distilled draft: whether a draft can assist a teacher, and how often the
teacher accepts its tokens.

transformers' `teacher.generate(..., assistant_model=draft)` lets the draft propose a few tokens and the teacher
check them in one forward pass; under greedy decoding the output is exactly the teacher's greedy output, and the
gain depends on how many proposed tokens the teacher accepts (DistillSpec, Zhou et al., 2023: a draft distilled on
the teacher's own distribution is accepted more often). When the two tokenizers differ, transformers' universal
assisted decoding re-tokenizes the text between them (`tokenizer=` and `assistant_tokenizer=`).

- `check_assistable(teacher_config, teacher_tokenizer, draft_config, draft_tokenizer)`: a ValueError naming the
  problem and the fix for a draft that cannot assist this teacher; returns "same_tokenizer" or "universal".
- `assisted_generate(teacher, draft, input_ids, max_new_tokens, ...)`: the tokens and an `AcceptanceCounts`
  (tokens drafted, tokens accepted, teacher forward passes) read from transformers' own candidate generator.
- `load_draft(folder, quantization=None)` / `quantize_draft(model, quantization)`: the draft as the assistant, its
  Linear layers optionally quantized to INT8 at load time (`"dynamic_int8"`: PyTorch's dynamic quantization, int8
  weights per output channel, activations quantized on the fly). A draft's weights are read once per proposed
  token, so on a CPU whose decoding is bound by memory traffic a quarter of the bytes makes each proposal cheaper;
  the teacher still checks every token, so the output stays the teacher's greedy output. The folder stays float32.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "DRAFT_QUANTIZATIONS",
    "AcceptanceCounts",
    "assisted_generate",
    "check_assistable",
    "load_draft",
    "quantize_draft",
]

SAME_TOKENIZER, UNIVERSAL = "same_tokenizer", "universal"
DYNAMIC_INT8 = "dynamic_int8"
DRAFT_QUANTIZATIONS = (None, DYNAMIC_INT8)  # None: the draft as saved (float32)


def check_draft_quantization(quantization: str | None, where: str = "draft quantization") -> None:
    """A ValueError naming the choices for a draft quantization this module does not know (`where`: what the
    message names, e.g. the recipe key)."""
    if quantization not in DRAFT_QUANTIZATIONS:
        raise ValueError(
            f"{where}: {quantization!r}; use {DYNAMIC_INT8} (INT8 Linear layers at load time) or leave it out "
            "(float32)."
        )


def quantize_draft(model: Any, quantization: str | None) -> Any:
    """`model` with its Linear layers quantized as `quantization` says (None: unchanged). dynamic_int8: PyTorch's
    dynamic quantization (torch.ao; int8 weights per output channel, int8 activations per call) of every Linear,
    the output layer included; embeddings and norms stay float32."""
    check_draft_quantization(quantization)
    if quantization is None:
        return model
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as error:
        raise ImportError(
            f"draft quantization {quantization}: this torch ({torch.__version__}) has no torch.ao.quantization "
            "dynamic quantization; leave the draft's quantization out (float32) or use torch 2.13."
        ) from error
    with warnings.catch_warnings():  # torch.ao announces its move to torchao; torch 2.13 still ships it
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        return quantize_dynamic(
            model.eval(), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        )


def load_draft(folder: Any, quantization: str | None = None) -> Any:
    """The draft saved in `folder` (a causal LM), in eval mode, quantized as `quantization` says, ready for
    `teacher.generate(..., assistant_model=draft)`."""
    from transformers import AutoModelForCausalLM

    check_draft_quantization(quantization)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return quantize_draft(model, quantization)


def check_assistable(
    teacher_config: Any, teacher_tokenizer: Any, draft_config: Any, draft_tokenizer: Any
) -> str:
    """How `draft` can assist `teacher` ("same_tokenizer" or "universal"), or a ValueError saying why it cannot."""
    if getattr(draft_config, "is_encoder_decoder", False) != getattr(
        teacher_config, "is_encoder_decoder", False
    ):
        raise ValueError(
            f"the draft ({draft_config.model_type}) and the teacher ({teacher_config.model_type}) must both be "
            "decoder-only or both encoder-decoder for assisted decoding; distil the draft from the teacher."
        )
    teacher_vocab, draft_vocab = teacher_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if teacher_vocab == draft_vocab:
        if draft_config.vocab_size < len(teacher_vocab):
            raise ValueError(
                f"the draft has {draft_config.vocab_size} vocabulary rows but the shared tokenizer has "
                f"{len(teacher_vocab)} tokens; the draft cannot propose every token the teacher may choose."
            )
        return SAME_TOKENIZER
    if getattr(teacher_config, "is_encoder_decoder", False):
        raise ValueError(
            "the draft's tokenizer differs from the teacher's, and transformers assists encoder-decoder models only "
            "with the same tokenizer; keep the teacher's vocabulary in the draft (no `vocab: data` pruning)."
        )
    for role, tokenizer in (("teacher", teacher_tokenizer), ("draft", draft_tokenizer)):
        if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token is None:
            raise ValueError(
                f"the draft's tokenizer differs from the teacher's, so assisted decoding must re-tokenize text "
                f"(universal assisted decoding); the {role}'s tokenizer must be a fast tokenizer with an end "
                "token; give the draft the teacher's tokenizer instead."
            )
    return UNIVERSAL


@dataclass
class AcceptanceCounts:
    """Over one or more assisted generations: tokens the draft proposed, tokens the teacher accepted, and
    verification passes (teacher forward calls); the acceptance rate is accepted / drafted."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    per_call: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) per verification

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def add(self, other: AcceptanceCounts) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.verifications += other.verifications
        self.per_call.extend(other.per_call)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("per_call")
        values["acceptance_rate"] = self.acceptance_rate
        values["mean_accepted_per_verification"] = (
            self.accepted / self.verifications if self.verifications else None
        )
        return values


class _CountingTeacher:
    """Wraps the candidate generator `generate` builds so that every verification is counted; installed on the
    teacher instance for one call and removed after it."""

    def __init__(self, model: Any, counts: AcceptanceCounts):
        self.model, self.counts = model, counts
        self.original = model._get_candidate_generator

    def __enter__(self) -> None:
        counts, original = self.counts, self.original

        def get_candidate_generator(*args: Any, **kwargs: Any) -> Any:
            generator = original(*args, **kwargs)
            update = generator.update_candidate_strategy

            def counted(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: int) -> Any:
                drafted = (
                    int(scores.shape[1]) - 1
                )  # the teacher scores the drafted tokens plus one of its own
                counts.drafted += drafted
                counts.accepted += int(num_matches)
                counts.verifications += 1
                counts.per_call.append((drafted, int(num_matches)))
                return update(input_ids, scores, num_matches)

            generator.update_candidate_strategy = counted
            return generator

        self.model._get_candidate_generator = get_candidate_generator

    def __exit__(self, *exc: Any) -> None:
        del self.model._get_candidate_generator  # the class's method again


@torch.inference_mode()
def assisted_generate(
    teacher: Any,
    draft: Any | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    tokenizer: Any | None = None,
    assistant_tokenizer: Any | None = None,
    num_assistant_tokens: int | None = None,
    schedule: str | None = None,
    confidence_threshold: float | None = None,
) -> tuple[torch.Tensor, AcceptanceCounts]:
    """Greedy generation of exactly `max_new_tokens` tokens (batch 1) by `teacher`, assisted by `draft` (None: the
    teacher alone); the end token is turned off (`eos_token_id=[]`) rather than forbidden (`min_new_tokens`, a logits
    processor on every position the teacher verifies and the draft proposes, which ordinary generation has not).
    Pass both tokenizers when they differ (universal assisted decoding). confidence_threshold: the draft stops
    proposing when its top token's probability falls below it (transformers' default 0.4, which it re-tunes during
    generation when scikit-learn is installed; 0 always proposes `num_assistant_tokens`; None leaves the draft's
    generation config as it is). Returns (new ids (1, max_new_tokens), counts)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"assisted decoding runs one prompt at a time; got a batch of {input_ids.shape[0]}.")
    counts = AcceptanceCounts()
    kwargs: dict[str, Any] = {}
    if draft is not None:
        kwargs["assistant_model"] = draft
        if assistant_tokenizer is not None:
            kwargs.update(tokenizer=tokenizer, assistant_tokenizer=assistant_tokenizer)
        if num_assistant_tokens is not None:
            draft.generation_config.num_assistant_tokens = num_assistant_tokens
        if schedule is not None:
            draft.generation_config.num_assistant_tokens_schedule = schedule
        if confidence_threshold is not None:
            draft.generation_config.assistant_confidence_threshold = confidence_threshold
    config = teacher.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    with _CountingTeacher(teacher, counts):
        output = teacher.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=[],  # no end token (teacher and draft): exactly max_new_tokens, no logits processor
            pad_token_id=pad,
            **kwargs,
        )
    return output[:, input_ids.shape[1] :], counts
