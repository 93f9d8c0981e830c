"""The stages of a translation compression recipe (Marian, BART, T5 folders): train the teacher (a Marian the
recipe trains on the training pairs), prune its encoder and decoder depth (`create_student`'s uniform choice) and
its vocabulary, distil with word-level KD (the teacher's token distributions) and sequence-level KD (its greedy
translations of the training sources, made once and kept in the stage's work folder), export to the generation
runtime. Folders and resumption as in `lm_stages.py`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from hf_distill.compression.generation_recipe import (
    GenerationDistillStage,
    GenerationPruneStage,
    GenerationRecipe,
)
from hf_distill.storage.atomic import atomic_write_text
from hf_distill.tasks.compression.generation_data import GenerationData
from hf_distill.tasks.compression.lm_stages import (
    save_stage,
    teacher_data_settings,
    train_with_resume,
    training_arguments,
)
from hf_distill.tasks.compression.stages import is_done, stage_settings


def teacher_config(recipe: GenerationRecipe, tokenizer: Any) -> Any:
    """A Marian with scaled embeddings (as the released Marian models: without them a small model trained from
    scratch barely learns, benchmarks/bench_translation.py), shared embeddings, no dropout."""
    from transformers import MarianConfig

    spec = recipe.teacher
    return MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=spec.hidden,
        encoder_layers=spec.layers,
        decoder_layers=spec.layers,
        encoder_attention_heads=spec.heads,
        decoder_attention_heads=spec.heads,
        encoder_ffn_dim=spec.intermediate,
        decoder_ffn_dim=spec.intermediate,
        max_position_embeddings=2 * recipe.data.block_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        share_encoder_decoder_embeddings=True,
        scale_embedding=True,
    )


def _pairs_dataset(pairs: list[tuple[str, str]], tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    encoded = tokenizer(sources, max_length=max_length, truncation=True)
    encoded["labels"] = tokenizer(text_target=targets, max_length=max_length, truncation=True)["input_ids"]
    return Dataset.from_dict(dict(encoded))


def _collator(tokenizer: Any, model: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)


def _train_pairs(data: GenerationData) -> list[tuple[str, str]]:
    return data.pairs["train"][: data.max_train_blocks]


def train_teacher(recipe: GenerationRecipe, data: GenerationData, folder: Path, work_dir: Path) -> None:
    from transformers import MarianMTModel, Seq2SeqTrainer

    settings = {"type": "train_teacher", **vars(recipe.teacher), "data": teacher_data_settings(recipe)}
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    tokenizer = data.tokenizer()
    torch.manual_seed(recipe.training.seed)
    model = MarianMTModel(teacher_config(recipe, tokenizer))
    args = training_arguments(
        recipe, work_dir / "teacher", recipe.teacher.train_steps, recipe.teacher.learning_rate, seq2seq=True
    )
    args.per_device_train_batch_size = recipe.teacher.batch_size
    dataset = _pairs_dataset(_train_pairs(data), tokenizer, data.block_size)
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=_collator(tokenizer, model)
    )
    results = train_with_resume(trainer, args)
    save_stage(model, tokenizer, folder, settings, started, train=results, train_pairs=len(dataset))


def prune(stage: GenerationPruneStage, data: GenerationData, source_dir: Path, folder: Path) -> None:
    from hf_distill import create_student
    from hf_distill.compression.pruning import prune_vocabulary, tokens_used

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    model = AutoModelForSeq2SeqLM.from_pretrained(source_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    params_before = sum(p.numel() for p in model.parameters())
    pruned = model
    if stage.encoder_layers is not None or stage.decoder_layers is not None:
        pruned = create_student(model, stage.encoder_layers, num_decoder_layers=stage.decoder_layers)
    kept = None
    if stage.vocab == "data":
        pairs = _train_pairs(data)
        keep = tokens_used(
            tokenizer, [s for s, _ in pairs] + [t for _, t in pairs], max_length=data.block_size
        )
        pruned, tokenizer = prune_vocabulary(pruned, tokenizer, keep)
        kept = len(tokenizer)
    save_stage(pruned, tokenizer, folder, settings, started, params_before=params_before, vocabulary=kept)


def _teacher_translations(
    teacher_dir: Path, pairs: list[tuple[str, str]], data: GenerationData, path: Path
) -> list[str]:
    """The teacher's greedy translations of the training sources, made once (sequence-level KD, Kim & Rush 2016)."""
    from hf_distill.tasks.translation.seq_kd import translate_with_teacher

    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir, dtype=torch.float32)
    translations = translate_with_teacher(
        teacher, AutoTokenizer.from_pretrained(teacher_dir), [s for s, _ in pairs],
        max_source_length=data.block_size, num_beams=1, max_length=2 * data.block_size,
    )  # fmt: skip
    atomic_write_text(path, json.dumps(translations))
    return translations


def distill(
    recipe: GenerationRecipe,
    stage: GenerationDistillStage,
    data: GenerationData,
    source_dir: Path,
    teacher_dir: Path,
    folder: Path,
    work_dir: Path,
) -> None:
    from transformers import Seq2SeqTrainer

    from hf_distill import Seq2SeqDistillationTrainer

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    stage_work = work_dir / stage.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(teacher_dir).get_vocab():
        raise ValueError(
            f"stage {stage.name}: the student's vocabulary differs from its teacher's ({teacher_dir}); prune the "
            "vocabulary after distilling, or distil from a teacher with the same vocabulary."
        )
    training = recipe.training
    alpha = training.alpha if stage.alpha is None else stage.alpha
    pairs = _train_pairs(data)
    if stage.seq_kd:
        stage_work.mkdir(parents=True, exist_ok=True)
        translations = _teacher_translations(
            teacher_dir, pairs, data, stage_work / "teacher_translations.json"
        )
        pairs = [(source, translation) for (source, _), translation in zip(pairs, translations)]
    student = AutoModelForSeq2SeqLM.from_pretrained(source_dir, dtype=torch.float32)
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir, dtype=torch.float32) if alpha > 0 else None
    lr = training.learning_rate if stage.learning_rate is None else stage.learning_rate
    args = training_arguments(
        recipe, stage_work / "run", stage.max_steps, lr, seq2seq=True, kd_loss=stage.kd_loss, alpha=alpha,
        temperature=training.temperature if stage.temperature is None else stage.temperature,
    )  # fmt: skip
    common = dict(
        model=student,
        args=args,
        train_dataset=_pairs_dataset(pairs, tokenizer, data.block_size),
        data_collator=_collator(tokenizer, student),
        processing_class=tokenizer,
    )
    if teacher is not None:
        trainer = Seq2SeqDistillationTrainer(teacher_model=teacher, **common)
    else:  # alpha 0: the references (or with seq_kd the teacher's translations) alone
        trainer = Seq2SeqTrainer(**common)
    results = train_with_resume(trainer, args)
    save_stage(trainer.model, tokenizer, folder, settings, started, train=results, teacher=str(teacher_dir))
