"""The flags of `scripts/distill_online.py`: where the stream is and how it is read, and when and how the teacher is
refreshed. The teacher and student flags are the shared `ModelArguments`; the per-chunk training of the student is
`DistillationTrainingArguments` (--num_train_epochs is per chunk)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_distill.tasks.online.stream import CHUNK_SUFFIXES


@dataclass
class StreamArguments:
    """The stream: a folder whose files are its chunks, taken in name order, and their columns."""

    stream_dir: str = field(
        metadata={
            "help": f"A folder of chunk files ({', '.join(CHUNK_SUFFIXES)}), one chunk each, processed in name order. "
            "Names starting with '.' are skipped: write a chunk under such a name and rename it when complete."
        }
    )
    chunk_glob: str = field(
        default="*", metadata={"help": "Which files of --stream_dir are chunks (a glob)."}
    )
    text_column_names: str = field(
        default="text", metadata={"help": "One or two text columns, comma-separated ('sentence1,sentence2')."}
    )
    label_column_name: str = field(
        default="label",
        metadata={
            "help": "The label column (class names of the teacher's head). Rows without a label are distilled on "
            "but not used to refresh the teacher; a chunk may lack the column."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per text after truncation."})
    poll_seconds: float = field(
        default=0.0,
        metadata={
            "help": "Wait for chunks that have not arrived yet, looking every this many seconds (0: process the "
            "chunks in the folder and stop)."
        },
    )
    idle_timeout_seconds: float = field(
        default=600.0,
        metadata={"help": "With --poll_seconds: stop after this many seconds without a new chunk."},
    )
    max_chunks: int | None = field(
        default=None, metadata={"help": "Stop after this many chunks of the stream (counted from its start)."}
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "A held-out labelled file on which teacher and student are evaluated after every chunk."
        },
    )

    def __post_init__(self):
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {self.max_seq_length}.")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {self.max_chunks}.")
        if self.poll_seconds < 0 or self.idle_timeout_seconds < 0:
            raise ValueError("poll_seconds and idle_timeout_seconds must be >= 0.")
        columns = self.text_columns
        if not 1 <= len(columns) <= 2:
            raise ValueError(
                f"text_column_names must name one or two columns, got {self.text_column_names!r}."
            )

    @property
    def text_columns(self) -> tuple[str, ...]:
        return tuple(column.strip() for column in self.text_column_names.split(",") if column.strip())


@dataclass
class OnlineArguments:
    """Online distillation: when the teacher is refreshed (fine-tuned on the newest labelled rows), and how.

    The student distils from the current teacher on every chunk; every --refresh_every chunks the teacher is first
    fine-tuned on the newest labelled rows."""

    refresh_every: int = field(
        default=2,
        metadata={
            "help": "Refresh the teacher after every N chunks (chunks N-1, 2N-1, ... counted from 0), before the "
            "student distils from it; 0 never refreshes it."
        },
    )
    refresh_window: int | None = field(
        default=None,
        metadata={
            "help": "The teacher is refreshed on the labelled rows of this many newest chunks (default N)."
        },
    )
    refresh_epochs: float = field(default=1.0, metadata={"help": "Epochs over those rows per refresh."})
    refresh_learning_rate: float = field(default=2e-5, metadata={"help": "The teacher's learning rate."})
    keep_checkpoints: int = field(
        default=2,
        metadata={
            "help": "Chunk checkpoints kept: the newest N, and the one holding the current teacher (0 keeps all)."
        },
    )

    def __post_init__(self):
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: never), got {self.refresh_every}.")
        if self.refresh_window is None:
            self.refresh_window = max(self.refresh_every, 1)
        if self.refresh_window < 1:
            raise ValueError(f"refresh_window must be >= 1, got {self.refresh_window}.")
        if self.refresh_epochs <= 0 or self.refresh_learning_rate <= 0:
            raise ValueError("refresh_epochs and refresh_learning_rate must be > 0.")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0: keep all), got {self.keep_checkpoints}.")
