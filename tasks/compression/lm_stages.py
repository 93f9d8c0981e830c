"""The stages of a causal-LM compression recipe: train the teacher (when the recipe trains one), prune, distil,
export to the generation runtime. Each writes its folder atomically with `stage.json` (as the classifier's stages
do, `stages.is_done`), so a killed run resumes at the stage it was in, and a training stage from its last
checkpoint under <output_dir>/work/<stage>/run.

Distillation goes through the LM recipe's machinery: `DistillationTrainer` on the training split packed into
blocks (`tasks.lm.data`), with live, fused or cached teacher logits (`caches.topk`), forward or reverse KL and
on-policy steps (lmbda) on prompt/completion rows cut from the same blocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from transformers.utils import logging

from hf_distill.compression.generation_recipe import (
    GenerationDistillStage,
    GenerationPruneStage,
    GenerationQuantizeStage,
    GenerationRecipe,
)
from hf_distill.compression.pruning.portable_tokenizer import make_tokenizer_folder_portable
from hf_distill.storage.atomic import atomic_directory, atomic_write_text
from hf_distill.tasks.compression.generation_data import GenerationData, ids_for
from hf_distill.tasks.compression.stages import STAGE_FILE, is_done, stage_settings

logger = logging.get_logger(__name__)


def finish(folder: Path, settings: dict[str, Any], started: float, **extra: Any) -> None:
    record = {"settings": settings, "seconds": round(time.perf_counter() - started, 1), **extra}
    atomic_write_text(folder / STAGE_FILE, json.dumps(record, indent=2, default=str))


def training_arguments(
    recipe: GenerationRecipe,
    output_dir: Path,
    max_steps: int,
    lr: float,
    *,
    seq2seq: bool = False,
    **extra: Any,
) -> Any:
    """The stage's trainer arguments (the Seq2Seq ones for translators); checkpoints every quarter, one kept."""
    from hf_distill.args import DistillationTrainingArguments, Seq2SeqDistillationTrainingArguments

    arguments = Seq2SeqDistillationTrainingArguments if seq2seq else DistillationTrainingArguments
    return arguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=recipe.training.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.01,
        save_strategy="steps",
        save_steps=max(25, max_steps // 4),
        save_total_limit=1,
        logging_steps=max(1, min(50, max_steps // 10)),
        report_to="none",
        seed=recipe.training.seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )


def train_with_resume(trainer: Any, args: Any) -> dict[str, Any]:
    from hf_distill.tasks.common.running import resume_checkpoint

    output = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    return {"train_runtime": output.metrics.get("train_runtime"), "train_loss": output.training_loss}


def save_stage(
    model: Any, tokenizer: Any, folder: Path, settings: dict[str, Any], started: float, **extra: Any
) -> None:
    with atomic_directory(folder, overwrite=True) as building:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        make_tokenizer_folder_portable(building)
        finish(building, settings, started, params=sum(p.numel() for p in model.parameters()), **extra)


# --------------------------------------------------------------------------------------------- teacher
def teacher_data_settings(recipe: GenerationRecipe) -> dict[str, Any]:
    """What the teacher's training depends on besides its own spec (not the report's settings, which may change
    without retraining it)."""
    data = recipe.data
    keys = (
        "bbc_text",
        "train_file",
        "block_size",
        "max_train_blocks",
        "max_articles",
        "source_lang",
        "target_lang",
    )
    return {key: getattr(data, key) for key in keys} | {"seed": recipe.training.seed}


def teacher_config(recipe: GenerationRecipe, tokenizer: Any) -> Any:
    """The Llama the recipe trains as its teacher (tied embeddings, positions for twice the block size)."""
    from transformers import LlamaConfig

    spec = recipe.teacher
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=2 * recipe.data.block_size,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def train_teacher(recipe: GenerationRecipe, data: GenerationData, folder: Path, work_dir: Path) -> None:
    """Train the recipe's teacher from scratch on the training blocks (plain Trainer, cross-entropy)."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer

    from hf_distill.tasks.lm.data import CausalLMCollator

    settings = {
        "type": "train_teacher",
        **vars(recipe.teacher),
        "data": teacher_data_settings(recipe),
    }
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    tokenizer = data.tokenizer()
    torch.manual_seed(recipe.training.seed)
    model = LlamaForCausalLM(teacher_config(recipe, tokenizer))
    blocks = data.train_blocks(tokenizer)
    args = training_arguments(
        recipe, work_dir / "teacher", recipe.teacher.train_steps, recipe.teacher.learning_rate
    )
    args.per_device_train_batch_size = recipe.teacher.batch_size
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": blocks}),
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
    )
    results = train_with_resume(trainer, args)
    save_stage(model, tokenizer, folder, settings, started, train=results, train_blocks=len(blocks))


# --------------------------------------------------------------------------------------------- prune
def _calibration(data: GenerationData, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    blocks = data.train_blocks(tokenizer)[: data.calibration_blocks]
    return [{"input_ids": torch.tensor(blocks[i : i + 8])} for i in range(0, len(blocks), 8)]


def pruning_spec(stage: GenerationPruneStage, layer_indices: list[int] | None = None) -> Any:
    from hf_distill.compression.pruning import PruningSpec

    return PruningSpec(
        heads=stage.heads,
        ffn=stage.ffn,
        hidden=stage.hidden,
        layers=None if layer_indices is not None else stage.layers,
        layer_indices=layer_indices,
    )


def kept_by_importance(layer_scores: torch.Tensor, count: int) -> list[int]:
    """The `count` layers of highest block importance (1 - cos(input, output)), in model order."""
    order = torch.argsort(layer_scores.double(), descending=True, stable=True)[:count]
    return sorted(int(i) for i in order)


def vocabulary_keep(tokenizer: Any, data: GenerationData) -> list[int]:
    """Token ids `vocab: data` keeps: the training split's, the prompts', the end token, every special token, and
    what the tokenizer's algorithm needs to reproduce them (BPE merge ancestors, the byte alphabet). The held-out
    text is not looked at."""
    from hf_distill.compression.pruning import tokens_used
    from hf_distill.compression.pruning.vocabulary import complete_keep_ids

    keep = set(tokens_used(tokenizer, data.texts["train"], complete=False))
    teacher_tokenizer = data.tokenizer()
    keep.update(i for prompt in data.prompt_ids() for i in ids_for(tokenizer, teacher_tokenizer, prompt))
    keep.add(tokenizer.eos_token_id)
    return complete_keep_ids(tokenizer, keep)


def prune(stage: GenerationPruneStage, data: GenerationData, source_dir: Path, folder: Path) -> None:
    from hf_distill.compression.pruning import measure_importance, prune_model, prune_vocabulary

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    params_before = sum(p.numel() for p in model.parameters())
    by_importance = stage.layers is not None and stage.depth == "importance"
    importance = None
    if stage.heads or stage.ffn or stage.hidden is not None or by_importance:
        importance = measure_importance(model, _calibration(data, tokenizer), layers=by_importance)
    layer_indices = kept_by_importance(importance.layers, stage.layers) if by_importance else None
    pruned = prune_model(model, pruning_spec(stage, layer_indices), importance)
    kept_tokens = None
    if stage.vocab == "data":
        keep = vocabulary_keep(tokenizer, data)
        pruned, tokenizer = prune_vocabulary(pruned, tokenizer, keep)
        kept_tokens = len(tokenizer)
    save_stage(
        pruned, tokenizer, folder, settings, started,
        params_before=params_before, layers_kept=getattr(pruned, "distilled_from_layers", None),
        vocabulary=kept_tokens,
        layer_importance=None if importance is None or importance.layers is None else importance.layers.tolist(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- distil
def teacher_view(student_dir: Path, teacher_dir: Path, work_dir: Path) -> Path:
    """The teacher under the student's vocabulary (its rows of the student's tokens) when vocabulary pruning gave
    the student fewer tokens, so that both read the same ids; the teacher's own folder otherwise."""
    from hf_distill.compression.pruning import prune_vocabulary

    student_vocab = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return teacher_dir
    missing = sorted(set(student_vocab) - set(teacher_vocab))
    if missing:
        raise ValueError(
            f"the student in {student_dir} has tokens its teacher {teacher_dir} lacks: {missing[:5]}."
        )
    view = work_dir / "teacher_view"
    if not (view / "config.json").is_file():
        keep = [teacher_vocab[token] for token in sorted(student_vocab, key=student_vocab.get)]
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        teacher, tokenizer = prune_vocabulary(teacher, teacher_tokenizer, keep)
        with atomic_directory(view, overwrite=True) as building:
            teacher.save_pretrained(building)
            tokenizer.save_pretrained(building)
    return view


def _rows(blocks: list[list[int]], prompt_tokens: int | None) -> dict[str, list[list[int]]]:
    """Training rows: whole blocks, or (on-policy) prompt/completion rows whose first `prompt_tokens` are the prompt."""
    rows: dict[str, list[list[int]]] = {"input_ids": blocks}
    if prompt_tokens:
        rows["labels"] = [[-100] * prompt_tokens + block[prompt_tokens:] for block in blocks]
    return rows


def distill(
    recipe: GenerationRecipe,
    stage: GenerationDistillStage,
    data: GenerationData,
    source_dir: Path,
    teacher_dir: Path,
    folder: Path,
    work_dir: Path,
) -> None:
    from datasets import Dataset

    from hf_distill import DistillationTrainer
    from hf_distill.tasks.lm.data import CausalLMCollator

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    stage_work = work_dir / stage.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    training = recipe.training
    alpha = training.alpha if stage.alpha is None else stage.alpha
    temperature = training.temperature if stage.temperature is None else stage.temperature
    uses_teacher = alpha > 0 or stage.lmbda > 0
    teacher_path = teacher_view(source_dir, teacher_dir, stage_work) if uses_teacher else None
    blocks = data.train_blocks(tokenizer)
    dataset = Dataset.from_dict(_rows(blocks, data.prompt_tokens if stage.lmbda > 0 else None))
    extra: dict[str, Any] = {
        "kd_loss": stage.kd_loss, "alpha": alpha, "temperature": temperature, "lmbda": stage.lmbda,
        "fused_kd_loss": stage.kd_source == "fused",
    }  # fmt: skip
    if stage.lmbda > 0:
        extra["on_policy_max_new_tokens"] = data.block_size - data.prompt_tokens
    teacher = None
    if uses_teacher:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    if uses_teacher and stage.kd_source == "cached":
        from hf_distill.caches.topk import build_logit_cache, load_logit_cache

        cache_dir = stage_work / "logit_cache"
        if not (cache_dir / "manifest.json").is_file():
            build_logit_cache(
                teacher, dataset, cache_dir, tokenizer=tokenizer, teacher_name=str(teacher_dir),
                block_size=data.block_size, temperature=temperature, top_k=stage.cache_top_k,
                logprobs_dtype="float16",
            )  # fmt: skip
        dataset, _ = load_logit_cache(cache_dir, dataset, tokenizer=tokenizer, block_size=data.block_size)
        extra["teacher_logits_cache"] = str(cache_dir)
        teacher = None
    lr = training.learning_rate if stage.learning_rate is None else stage.learning_rate
    args = training_arguments(recipe, stage_work / "run", stage.max_steps, lr, **extra)
    student = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    common = dict(
        model=student,
        args=args,
        train_dataset=dataset,
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    if uses_teacher:
        trainer = DistillationTrainer(teacher_model=teacher, **common)
    else:  # alpha 0: the labels alone, with the plain Trainer (the baseline a KD stage is compared with)
        trainer = Trainer(**common)
    results = train_with_resume(trainer, args)
    save_stage(trainer.model, tokenizer, folder, settings, started, train=results, teacher=str(teacher_dir))


# --------------------------------------------------------------------------------------------- deploy
def quantize(stage: GenerationQuantizeStage, source_dir: Path, folder: Path, work_dir: Path) -> None:
    """Export to the generation runtime (`hf_distill.compression.generation_runtime`), weights in `quantization`."""
    from hf_distill.compression.generation_runtime import export_ctranslate2

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    export_ctranslate2(
        source_dir, folder, quantization=stage.quantization, work_dir=work_dir / f"{stage.name}_export"
    )
    finish(folder, settings, started, exported_from=str(source_dir))
