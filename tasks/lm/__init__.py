"""The causal-LM recipe (scripts/distill_lm.py, scripts/cache_teacher_logits.py) in one namespace: `lm.<name>`.

Each idea lives in its own module; this one only gathers their public names:

- lm_args.py     the flags: models, data, sequence-level KD, LoRA, report
- lm_data.py     loading, the data layouts (raw text, prompt/completion, chat), tokenization, packing, the collator
- lm_models.py   the shared tokenizer, teacher and student loading, vocabulary and position limits, LoRA
- lm_seq_kd.py   sequence-level KD: the teacher's completions, kept in the sequence-KD cache (seq_kd_cache.py)
- lm_report.py   the report's greedy generations and tokens per second
- lm_cross_tokenizer.py  text rows for a teacher with another tokenizer (--cross_tokenizer); tokenizers for tests
"""

from __future__ import annotations

from hf_distill.tasks.common.seq_kd_cache import DATA_DIR as SEQ_KD_DATA_DIR
from hf_distill.tasks.lm.args import (
    DATA_FORMATS,
    DEFAULT_BLOCK_SIZE,
    MESSAGES,
    PROMPT_COMPLETION,
    TEXT,
    DataArguments,
    LMModelArguments,
    LMReportArguments,
    LoraArguments,
    SequenceKDArguments,
    TeacherArguments,
)
from hf_distill.tasks.lm.cross_tokenizer import text_blocks, train_tokenizer
from hf_distill.tasks.lm.data import (
    CausalLMCollator,
    DataFormat,
    check_splits,
    encode_prompt_completion,
    load_raw_datasets,
    pack_into_blocks,
    preprocess,
    prompt_ids_of,
    render_messages,
    resolve_block_size,
    resolve_data_format,
    tokenize_split,
)
from hf_distill.tasks.lm.models import (
    apply_lora,
    check_vocabulary,
    load_causal_lm,
    load_teacher,
    load_tokenizers,
    make_student,
    merge_lora,
    position_limit,
    student_vocab_size,
)
from hf_distill.tasks.lm.report import (
    generations_markdown,
    greedy_generations,
    report_prompts,
    tokens_per_second,
)
from hf_distill.tasks.lm.seq_kd import sequence_kd_dataset

__all__ = [
    "DATA_FORMATS",
    "DEFAULT_BLOCK_SIZE",
    "MESSAGES",
    "PROMPT_COMPLETION",
    "SEQ_KD_DATA_DIR",
    "TEXT",
    "CausalLMCollator",
    "DataArguments",
    "DataFormat",
    "LMModelArguments",
    "LMReportArguments",
    "LoraArguments",
    "SequenceKDArguments",
    "TeacherArguments",
    "apply_lora",
    "check_splits",
    "check_vocabulary",
    "encode_prompt_completion",
    "generations_markdown",
    "greedy_generations",
    "load_causal_lm",
    "load_raw_datasets",
    "load_teacher",
    "load_tokenizers",
    "make_student",
    "merge_lora",
    "pack_into_blocks",
    "position_limit",
    "preprocess",
    "prompt_ids_of",
    "render_messages",
    "report_prompts",
    "resolve_block_size",
    "resolve_data_format",
    "sequence_kd_dataset",
    "student_vocab_size",
    "text_blocks",
    "tokenize_split",
    "train_tokenizer",
    "tokens_per_second",
]
