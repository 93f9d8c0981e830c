"""The flags of the causal-LM recipe: teacher and student, data (the flags of run_clm.py plus prompt/completion and
chat data), sequence-level KD, LoRA students, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_distill.tasks.common.arguments import LoadingArguments, ModelArguments, ReportArguments
from hf_distill.tasks.common.raw_data import DataArguments as BaseDataArguments
from hf_distill.tasks.common.raw_data import check_file_types

TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt_completion", "messages"
DATA_FORMATS = ("auto", TEXT, PROMPT_COMPLETION, MESSAGES)
FILE_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".csv", ".parquet")
DEFAULT_BLOCK_SIZE = 1024


@dataclass(kw_only=True)
class LMModelArguments(ModelArguments):
    """Teacher and student of a causal-LM distillation run."""

    teacher_tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's tokenizer, if not stored with the teacher. It must equal the student's: "
            "different vocabularies are rejected before training."
        },
    )


@dataclass(kw_only=True)
class TeacherArguments(LoadingArguments):
    """The teacher alone (scripts/cache_teacher_logits.py)."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "The teacher: a Hub name or a local directory with config.json."}
    )
    teacher_tokenizer_name: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer, if not stored with the teacher."}
    )


@dataclass
class DataArguments(BaseDataArguments):
    """Which text to train and evaluate on, and how it becomes model inputs (flags of run_clm.py plus
    prompt/completion data)."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: .txt (one text per line), .json/.jsonl, .csv or .parquet."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (blocks for raw text)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation examples (blocks for raw text)."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": f"One of {DATA_FORMATS}. auto: a messages column means chat data, prompt and completion "
            "columns mean prompt/completion data, otherwise raw text."
        },
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column of raw text (default 'text')."}
    )
    prompt_column_name: str = field(
        default="prompt", metadata={"help": "Prompt column of prompt/completion data."}
    )
    completion_column_name: str = field(
        default="completion", metadata={"help": "Completion column of prompt/completion data."}
    )
    messages_column_name: str = field(
        default="messages",
        metadata={
            "help": "Column of chat data: lists of {'role', 'content'} whose last message (the assistant's) is "
            "learned; rendered with the tokenizer's chat template when it has one."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training block (raw text), or the maximum length of a prompt/completion row. "
            f"Default: the tokenizer's maximum length, at most {DEFAULT_BLOCK_SIZE}. Never more than the tokenizer's "
            "maximum length nor the teacher's or student's position limit (max_position_embeddings, n_positions "
            "for GPT-2): a larger value is lowered to them, with a warning, as run_clm.py does."
        },
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percentage of the training data held out for evaluation when there is no validation split."
        },
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks of .txt files."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the data instead of loading it (training then needs --max_steps, and evaluation "
            "--max_eval_samples; not with --teacher_logits_cache or --seq_kd, nor for building a cache)."
        },
    )

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}.")
        if self.dataset_name is None and not self.data_files:
            raise ValueError("No data: pass --dataset_name, or --train_file (and --validation_file).")
        check_file_types(self.data_files.values(), FILE_SUFFIXES)
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 tokens, got {self.block_size}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )


@dataclass
class SequenceKDArguments:
    """Sequence-level KD (Kim & Rush, 2016): train on the teacher's own completions."""

    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Replace the training completions with the teacher's, generated once before training and "
            "cached (prompt/completion or chat data only)."
        },
    )
    seq_kd_num_beams: int = field(default=1, metadata={"help": "Beams of the teacher's search (1 = greedy)."})
    seq_kd_max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Longest completion the teacher writes. Where a batch's longest prompt plus this exceeds the "
            "teacher's position limit (max_position_embeddings, n_positions for GPT-2), that batch's completions "
            "stop at the limit, with a warning. The teacher only writes ids the student and tokenizer share."
        },
    )
    seq_kd_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    seq_kd_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the teacher's completions are cached (default <output_dir>/seq_kd_cache). A cache built "
            "from other prompts, teacher or settings is rebuilt."
        },
    )
    seq_kd_overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Regenerate the cache even when its manifest matches this run (e.g. it holds token ids the "
            "student cannot read, which a run refuses)."
        },
    )

    def __post_init__(self):
        if self.seq_kd_num_beams < 1 or self.seq_kd_max_new_tokens < 1 or self.seq_kd_batch_size < 1:
            raise ValueError(
                "seq_kd_num_beams, seq_kd_max_new_tokens and seq_kd_batch_size must be >= 1, got "
                f"{self.seq_kd_num_beams}, {self.seq_kd_max_new_tokens} and {self.seq_kd_batch_size}."
            )


@dataclass
class LoraArguments:
    """A LoRA student (peft): only low-rank adapters are trained and saved."""

    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters on the student instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Modules that get adapters: comma-separated names (q_proj,v_proj) or 'all-linear'."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "After training, merge the adapters into the student and save it in <output_dir>/merged."
        },
    )

    def __post_init__(self):
        if self.merge_lora and not self.use_peft:
            raise ValueError("--merge_lora merges LoRA adapters, so it needs --use_peft.")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"lora_r must be >= 1 and lora_dropout in [0, 1), got {self.lora_r} and {self.lora_dropout}."
            )

    @property
    def target_modules(self) -> str | list[str]:
        value = self.lora_target_modules.strip()
        if value == "all-linear":
            return value
        modules = [name.strip() for name in value.split(",") if name.strip()]
        if not modules:
            raise ValueError(
                "lora_target_modules is empty; pass module names such as 'q_proj,v_proj' or 'all-linear'."
            )
        return modules


@dataclass
class LMReportArguments(ReportArguments):
    """The report, plus greedy generations of teacher and student on validation prompts."""

    report_batch_sizes: str = field(
        default="1,8",
        metadata={"help": "Batch sizes at which latency and tokens/s are measured, comma-separated."},
    )
    report_generations: int = field(
        default=3,
        metadata={"help": "Validation prompts that teacher and student complete greedily in the report."},
    )
    report_prompt_tokens: int = field(
        default=16,
        metadata={"help": "Raw-text data: the first N tokens of a validation block make a report prompt."},
    )
    report_max_new_tokens: int = field(
        default=32,
        metadata={
            "help": "Tokens generated per report prompt; fewer, with a warning, where the prompt plus these exceed "
            "the model's position limit (max_position_embeddings, n_positions for GPT-2)."
        },
    )
