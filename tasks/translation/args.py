"""The flags of the translation recipe: data (those of transformers' run_translation.py), the student's
encoder and decoder depth, and sequence-level KD."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_distill.tasks.common.arguments import ModelArguments
from hf_distill.tasks.common.raw_data import DataArguments as BaseDataArguments

FILE_SUFFIXES = (".json", ".jsonl")
SEQ_KD_MIXES = ("none", "concat")


@dataclass
class DataArguments(BaseDataArguments):
    """Which data to translate and how to turn it into model inputs (the flags of run_translation.py)."""

    source_lang: str | None = field(
        default=None,
        metadata={
            "help": "Source language: its key in the translation pairs ('en'), or an mBART/NLLB code ('en_XX')."
        },
    )
    target_lang: str | None = field(
        default=None, metadata={"help": "Target language, same format as source_lang."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A translation dataset on the Hub (e.g. wmt16)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration (e.g. de-en)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": 'Training data: JSON lines, one {"translation": {"en": "...", "de": "..."}} per line.'
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (BLEU/chrF), same format."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Prediction data (--do_predict), same format."}
    )
    source_prefix: str | None = field(
        default=None,
        metadata={"help": "Text put before every source, e.g. 'translate English to German: ' for T5."},
    )
    max_source_length: int = field(
        default=1024,
        metadata={
            "help": "Source tokens per example after tokenization; longer ones are truncated. Lowered, with a "
            "warning, to the teacher's or student's position limit (max_position_embeddings) when above it."
        },
    )
    max_target_length: int = field(
        default=128,
        metadata={
            "help": "Target tokens per training example after tokenization; longer ones are truncated. Lowered, "
            "with a warning, to the teacher's or student's position limit (max_position_embeddings) when above it."
        },
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Target tokens per evaluation example; also the default of --generation_max_length. "
            "Default: max_target_length. This and --generation_max_length are lowered, with a warning, to the "
            "teacher's or student's position limit (max_position_embeddings) when above it, so that the default "
            "lengths work with any model."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every example to the maximum lengths (static shapes, e.g. for TPUs). By default batches are "
            "padded to their longest example, which is faster on CPU and GPU."
        },
    )
    num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Beams for evaluation and prediction; overrides --generation_num_beams when given."
        },
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token forced as the first generated token, for multilingual models: the target language code "
            "of mBART-50 (de_DE) or NLLB (deu_Latn)."
        },
    )
    ignore_pad_token_for_loss: bool = field(
        default=True,
        metadata={"help": "Replace padding in the labels by -100 so that neither the loss nor KD counts it."},
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N prediction examples."}
    )

    def __post_init__(self):
        if not self.source_lang or not self.target_lang:
            raise ValueError(
                f"Pass --source_lang and --target_lang (keys of the translation pairs, e.g. en and de); got "
                f"{self.source_lang!r} and {self.target_lang!r}."
            )
        if self.dataset_name is None and not self.data_files:
            raise ValueError("No data: pass --dataset_name, or --train_file/--validation_file (JSON lines).")
        for path in self.data_files.values():
            if Path(path).suffix.lower() not in FILE_SUFFIXES:
                raise ValueError(
                    f"Data file {path!r} must be JSON lines ({', '.join(FILE_SUFFIXES)}) with one "
                    '{"translation": {...}} object per line.'
                )
        for name in ("max_source_length", "max_target_length", "val_max_target_length", "num_beams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


@dataclass(kw_only=True)
class Seq2SeqModelArguments(ModelArguments):
    """`ModelArguments` plus the decoder depth of a student built from an encoder-decoder teacher.

    --student_num_layers shrinks the encoder, --student_num_decoder_layers the decoder. A deep encoder and a
    shallow decoder is the usual speed win: the decoder runs once per generated token.
    """

    student_num_decoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layers of a student built from the teacher (evenly spaced). Default: all of the "
            "teacher's decoder layers."
        },
    )
    student_decoder_layers: str | None = field(
        default=None,
        metadata={"help": "Which teacher decoder layers the student copies, e.g. '0,5' (0-based)."},
    )

    def __post_init__(self):
        if self.student_num_decoder_layers is not None and self.student_num_decoder_layers < 1:
            raise ValueError(
                f"student_num_decoder_layers must be >= 1, got {self.student_num_decoder_layers}."
            )
        decoder_layers = self.student_decoder_layer_indices()
        if (
            decoder_layers is not None
            and self.student_num_decoder_layers is not None
            and len(decoder_layers) != self.student_num_decoder_layers
        ):
            raise ValueError(
                f"student_decoder_layers {self.student_decoder_layers!r} lists {len(decoder_layers)} layers but "
                f"student_num_decoder_layers is {self.student_num_decoder_layers}; pass one of the two or make "
                "them agree."
            )
        shrinks_decoder = self.student_num_decoder_layers is not None or decoder_layers is not None
        if shrinks_decoder and self.student_model_name_or_path is not None:
            raise ValueError(
                "Pass either --student_model_name_or_path (a pretrained student) or --student_num_decoder_layers / "
                "--student_decoder_layers (a student built from the teacher), not both."
            )
        if shrinks_decoder and self.student_num_layers is None and self.student_layers is None:
            return  # only the decoder shrinks; the encoder keeps all of the teacher's layers
        super().__post_init__()

    def student_decoder_layer_indices(self) -> list[int] | None:
        """--student_decoder_layers as a list of ints, or None when not given."""
        if self.student_decoder_layers is None or self.student_decoder_layers.strip().lower() in (
            "",
            "uniform",
        ):
            return None
        try:
            return [int(part) for part in self.student_decoder_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                "student_decoder_layers must be comma-separated layer indices such as '0,5', got "
                f"{self.student_decoder_layers!r}."
            ) from None


@dataclass
class SeqKDArguments:
    """Sequence-level knowledge distillation: train on the teacher's own translations."""

    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Translate the training sources once with the teacher's beam search, cache the translations "
            "and train the student on them (Kim & Rush, 2016)."
        },
    )
    seq_kd_num_beams: int = field(
        default=4, metadata={"help": "Beam size of the teacher's translations (--seq_kd)."}
    )
    seq_kd_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum length in tokens of the teacher's translations, decoder start token included. "
            "Default: --max_target_length. Lowered, with a warning, to the teacher's position limit "
            "(max_position_embeddings) when above it. The teacher only writes ids the student and tokenizer share."
        },
    )
    seq_kd_batch_size: int = field(
        default=32, metadata={"help": "Source sentences per teacher generate() call when building the cache."}
    )
    seq_kd_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the teacher's translations are cached. Default: <output_dir>/seq_kd_cache."},
    )
    seq_kd_mix: str = field(
        default="none",
        metadata={
            "help": f"One of {SEQ_KD_MIXES}. none: train on the teacher's translations alone; concat: train on "
            "both the reference pairs and the teacher's pairs (twice the examples per epoch)."
        },
    )
    seq_kd_overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Regenerate the cache even when its manifest matches this run (e.g. the teacher's weights "
            "changed in a way the fingerprint cannot see, or the generation code did)."
        },
    )

    def __post_init__(self):
        if self.seq_kd_num_beams < 1:
            raise ValueError(f"seq_kd_num_beams must be >= 1, got {self.seq_kd_num_beams}.")
        if self.seq_kd_max_length is not None and self.seq_kd_max_length < 2:
            raise ValueError(
                f"seq_kd_max_length must be >= 2 (decoder start token plus at least one token), got "
                f"{self.seq_kd_max_length}."
            )
        if self.seq_kd_batch_size < 1:
            raise ValueError(f"seq_kd_batch_size must be >= 1, got {self.seq_kd_batch_size}.")
        if self.seq_kd_mix not in SEQ_KD_MIXES:
            raise ValueError(f"seq_kd_mix must be one of {SEQ_KD_MIXES}, got {self.seq_kd_mix!r}.")
