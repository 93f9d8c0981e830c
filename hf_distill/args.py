"""Training arguments for distillation: every `TrainingArguments` field plus the distillation knobs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from hf_distill.losses.cross_tokenizer import CROSS_TOKENIZER_MODES
from hf_distill.losses.features import ATTENTION_HEAD_MAPPINGS
from hf_distill.losses.mixture import normalised_weights

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")
HIDDEN_LOSSES = ("mse", "cosine")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TEACHER_WEIGHTINGS = ("fixed", "confidence")

LayerMap = list[tuple[int, int]]

# Settings that only one kind of student uses: recipes for the others leave them out of their --help.
CAUSAL_LM_ONLY = (
    "fused_kd_loss",
    "lmbda",
    "on_policy_max_new_tokens",
    "on_policy_temperature",
    "cross_tokenizer",
    "uld_weight",
)
SEQ2SEQ_ONLY = ("decoder_layer_map",)
# The settings of sentence-embedding students (task_type "sentence_embedding"): other recipes leave them out.
SENTENCE_EMBEDDING_ONLY = ("embedding_mse_weight", "embedding_cosine_weight", "embedding_similarity_weight")
_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

# What a student's outputs can mean (`task_type`): the kind of prediction (one per example, per token, the next
# token, per decoder position, a start/end span) and, for sequence heads, the problem type.
SEQUENCE, TOKEN, CAUSAL_LM, SEQ2SEQ, QUESTION_ANSWERING = (
    "sequence",
    "token",
    "causal_lm",
    "seq2seq",
    "question_answering",
)

# One pooled embedding per text (hf_distill.embeddings.SentenceEmbedder): no logits, no labels.
SENTENCE_EMBEDDING = "sentence_embedding"

# The values of `DistillationTrainingArguments.task_type`, and what each means for the logits and labels.
TASK_TYPES = {
    "sequence_classification": (SEQUENCE, "single_label_classification"),
    "multi_label_classification": (SEQUENCE, "multi_label_classification"),
    "regression": (SEQUENCE, "regression"),
    "token_classification": (TOKEN, None),
    "masked_lm": (TOKEN, None),
    "question_answering": (QUESTION_ANSWERING, None),
    "causal_lm": (CAUSAL_LM, None),
    "seq2seq": (SEQ2SEQ, None),
    "sentence_embedding": (SENTENCE_EMBEDDING, None),
}


def parse_layer_map(spec: str | LayerMap) -> str | LayerMap:
    """Parse `"uniform"` or `"s:t,s:t,..."` (student_layer:teacher_layer) into `"uniform"` or a list of pairs."""
    if isinstance(spec, list):
        return [(int(s), int(t)) for s, t in spec]
    if spec.strip().lower() == "uniform":
        return "uniform"
    pairs = []
    for item in spec.split(","):
        match = _PAIR.match(item)
        if match is None:
            raise ValueError(
                f"layer map {spec!r} is not valid: {item!r} is not a 'student_layer:teacher_layer' pair. "
                "Use 'uniform' or pairs such as '1:2,2:4,3:6'."
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(
            f"layer map {spec!r} maps a student layer twice; give each student layer one teacher layer."
        )
    return pairs


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the settings of knowledge distillation.

    The training objective is
    `(1 - alpha) * task_loss + alpha * kd_loss + hidden_weight * hidden_loss + attention_weight * attention_loss`;
    a batch without labels trains on the distillation terms alone.
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature applied to teacher and student logits for the KD term (> 0)."},
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the soft KD term in [0, 1]; the hard-label task loss gets 1 - alpha."},
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": f"Divergence between teacher and student outputs, one of {KD_LOSSES}."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation beta of the generalised Jensen-Shannon divergence (kd_loss=jsd), in [0, 1]."
        },
    )
    kd_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the KD loss over this many positions at a time to bound memory (same result)."
        },
    )
    fused_kd_loss: bool = field(
        default=False,
        metadata={
            "help": "Causal LMs: compute student and teacher logits chunk by chunk inside the KD loss so the full "
            "(batch, seq, vocab) logits are never formed."
        },
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state matching loss (0 turns it off)."}
    )
    hidden_loss: str = field(
        default="mse", metadata={"help": f"Distance used for hidden-state matching, one of {HIDDEN_LOSSES}."}
    )
    layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Which student layer matches which teacher layer: 'uniform' or explicit pairs "
            "'student:teacher,...' where 0 is the embedding output and k the output of layer k. For "
            "encoder-decoder models this is the encoder's map."
        },
    )
    decoder_layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Encoder-decoder models: the layer map of the decoder, in the format of layer_map."
        },
    )
    attention_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of attention-map matching (0 turns it off). Needs eager attention; see "
            "attention_head_mapping for students with fewer heads."
        },
    )
    attention_head_mapping: str = field(
        default="per_head",
        metadata={
            "help": "How attention maps are compared: 'per_head' (student head i against teacher head i; the head "
            "counts must be equal) or 'mean' (the maps averaged over heads, for a student with another head count, "
            "such as one pruned to fewer heads).",
            "choices": ["per_head", "mean"],
        },
    )
    teacher_logits_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory of cached teacher top-k log-probabilities (scripts/cache_teacher_logits.py). Training "
            "then needs no teacher in memory; batches carry teacher_topk_logprobs/teacher_topk_indices (and "
            "teacher_tail_logmass, the teacher's remaining mass tempered at the cache's temperature, which must equal "
            "--temperature). A cache may hold one teacher, the mixture of several (with their weights), a "
            "classifier's classes, or a teacher with another tokenizer (--cross_tokenizer)."
        },
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD): the fraction of optimizer steps whose completions are sampled "
            "from the student and scored by the teacher. Needs prompt/completion data."
        },
    )
    on_policy_max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Tokens the student samples per prompt for on-policy steps (lmbda > 0); the LM recipe lowers it, "
            "with a warning, so that prompt and completion fit the model's position limit."
        },
    )
    on_policy_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the student for on-policy steps (lmbda > 0)."}
    )
    task_type: str | None = field(
        default=None,
        metadata={
            "help": "What the student's outputs mean, one of "
            f"{sorted(TASK_TYPES)}; by default read from the model's class (subclasses of transformers heads "
            "included) and config. Needed for custom models that neither says."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": f"dtype the teacher runs in, one of {TEACHER_DTYPES}; 'auto' keeps the loaded dtype."
        },
    )
    cross_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Causal LMs whose teacher tokenizes text differently (hf_distill/cross_tokenizer.py): KD at the "
            "positions where both tokenizations have read the same text and predict the same span, as 'exact' "
            "(kd_loss over the tokens whose normalised strings both vocabularies share, renormalised), 'uld' "
            "(Universal Logit Distillation: L1 between sorted probabilities) or 'hybrid' (exact on the shared "
            "tokens + uld_weight * ULD on the rest). None: different tokenizers are refused."
        },
    )
    uld_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the ULD term with cross_tokenizer 'uld' or 'hybrid' (>= 0)."},
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With several teachers: one weight per teacher, in their order (normalised to sum to 1; equal "
            "weights by default). The KD target is the weighted mixture of the teachers' softened distributions "
            "(hf_distill/ensemble.py)."
        },
    )
    embedding_mse_weight: float = field(
        default=1.0,
        metadata={
            "help": "Sentence-embedding students: weight of the mean squared error between the student's pooled "
            "embedding (projected to the teacher's dimension) and the teacher's (>= 0)."
        },
    )
    embedding_cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "Sentence-embedding students: weight of 1 - cos(student, teacher) per text (>= 0)."
        },
    )
    embedding_similarity_weight: float = field(
        default=0.0,
        metadata={
            "help": "Sentence-embedding students: weight of the squared difference between the student's and the "
            "teacher's in-batch cosine-similarity matrices (>= 0)."
        },
    )
    teacher_weighting: str = field(
        default="fixed",
        metadata={
            "help": f"With several teachers, one of {TEACHER_WEIGHTINGS}: 'confidence' multiplies each teacher's "
            "weight, per example, by its probability of the gold label (renormalised; unlabelled examples keep the "
            "fixed weights)."
        },
    )

    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "When training on CPU under glibc, keep freed memory in the process for the next step instead of "
            "returning it to the OS and faulting it in again (raises malloc's mmap and trim thresholds for the "
            "process; about 5 percent of a step in benchmarks/bench_toolkits.py). False leaves the allocator alone."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature}; a typical value is 1.0 to 4.0."
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (weight of the KD term; the task loss gets 1 - alpha), got {self.alpha}."
            )
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {KD_LOSSES}, got {self.kd_loss!r}.")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}.")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(
                f"kd_chunk_size must be a positive number of positions, got {self.kd_chunk_size}."
            )
        if self.hidden_weight < 0:
            raise ValueError(
                f"hidden_weight must be >= 0 (0 turns hidden matching off), got {self.hidden_weight}."
            )
        if self.attention_weight < 0:
            raise ValueError(
                f"attention_weight must be >= 0 (0 turns attention matching off), got {self.attention_weight}."
            )
        if self.attention_head_mapping not in ATTENTION_HEAD_MAPPINGS:
            raise ValueError(
                f"attention_head_mapping must be one of {ATTENTION_HEAD_MAPPINGS}, got {self.attention_head_mapping!r}."
            )
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {self.hidden_loss!r}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"lmbda is the fraction of on-policy steps and must be in [0, 1], got {self.lmbda}."
            )
        if self.on_policy_max_new_tokens < 1 or not self.on_policy_temperature > 0:
            raise ValueError(
                "on_policy_max_new_tokens must be >= 1 and on_policy_temperature > 0, got "
                f"{self.on_policy_max_new_tokens} and {self.on_policy_temperature}."
            )
        if self.teacher_logits_cache is not None and (
            self.hidden_weight > 0 or self.attention_weight > 0 or self.lmbda > 0
        ):
            raise ValueError(
                "teacher_logits_cache holds only the teacher's top-k output probabilities, so hidden/attention "
                "matching and on-policy steps (lmbda), which need the teacher itself, cannot use it; drop "
                "--teacher_logits_cache or set hidden_weight, attention_weight and lmbda to 0."
            )
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(
                f"task_type must be one of {sorted(TASK_TYPES)} or None, got {self.task_type!r}."
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        if self.cross_tokenizer is not None and self.cross_tokenizer not in CROSS_TOKENIZER_MODES:
            raise ValueError(
                f"cross_tokenizer must be one of {CROSS_TOKENIZER_MODES} or None, got {self.cross_tokenizer!r}."
            )
        if self.uld_weight < 0:
            raise ValueError(f"uld_weight must be >= 0, got {self.uld_weight}.")
        embedding_weights = {name: getattr(self, name) for name in SENTENCE_EMBEDDING_ONLY}
        if min(embedding_weights.values()) < 0 or max(embedding_weights.values()) <= 0:
            raise ValueError(
                f"the embedding loss weights must be >= 0 with at least one > 0, got {embedding_weights}; "
                "e.g. --embedding_mse_weight 1."
            )
        if self.teacher_weighting not in TEACHER_WEIGHTINGS:
            raise ValueError(
                f"teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {self.teacher_weighting!r}."
            )
        if self.teacher_weights is not None:
            # Checked here for sign and sum; the count is checked by the trainer, against the teachers.
            normalised_weights(self.teacher_weights, len(self.teacher_weights))
        # Parsed here so that a malformed map fails before any model is loaded; ranges are checked by the
        # trainer once the layer counts are known.
        parse_layer_map(self.layer_map)
        parse_layer_map(self.decoder_layer_map)


@dataclass
class Seq2SeqDistillationTrainingArguments(DistillationTrainingArguments, Seq2SeqTrainingArguments):
    """Distillation arguments with the generation settings of `Seq2SeqTrainingArguments`
    (`predict_with_generate`, `generation_max_length`, `generation_num_beams`)."""


def checked_trainer_arguments(teacher_model: Any, args: Any) -> DistillationTrainingArguments:
    """The `args` DistillationTrainer runs with (defaults when None), refusing the mistakes of calling it like
    `Trainer`: training arguments passed where the teacher goes, or plain `TrainingArguments`."""
    if isinstance(teacher_model, TrainingArguments):
        raise TypeError(
            "DistillationTrainer's second argument is the teacher, but it got training arguments: "
            "DistillationTrainer(student, training_args) reads training_args as the teacher. Pass the models "
            "by keyword: DistillationTrainer(model=student, teacher_model=teacher, args=training_args, ...)."
        )
    if args is None:
        args = DistillationTrainingArguments(output_dir="trainer_output")
    if not isinstance(args, DistillationTrainingArguments):
        raise TypeError(
            f"args must be DistillationTrainingArguments, got {type(args).__name__}; build it with the same "
            "fields plus the distillation ones (temperature, alpha, kd_loss, ...)."
        )
    return args
