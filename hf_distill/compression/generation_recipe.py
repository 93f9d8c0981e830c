"""A compression recipe for generation models: `task: causal_lm` or `task: translation` in the same YAML shape as
the classifier's (`recipe.py`), with stages that prune, distil and deploy a model that generates, and an
`assisted` section for draft models.

```yaml
task: causal_lm
data: {bbc_text: true, block_size: 128, prompts: 8, prompt_tokens: 32, new_tokens: 64}
teacher: {train_steps: 1200, layers: 8, hidden: 512, heads: 8, intermediate: 1024, vocab_size: 4096}
training: {batch_size: 16, learning_rate: 1.0e-3, temperature: 1.0, alpha: 0.5, seed: 42}
stages:
  - {name: pruned, type: prune, layers: 4, depth: importance, ffn: 0.25}
  - {name: distilled, type: distill, max_steps: 400, kd_loss: forward_kl}
  - {name: int8, type: quantize, runtime: ctranslate2, quantization: int8}
  - {name: draft_pruned, type: prune, from: teacher, layers: 1, hidden: 256, ffn: 0.5}
  - {name: draft_kd, type: distill, max_steps: 300}
  - {name: draft_labels, type: distill, from: draft_pruned, max_steps: 300, alpha: 0}
final: int8
assisted: {draft: draft_kd, labels_only: draft_labels}
targets: {max_size_pct: 25, min_speedup_b1: 4, min_runtime_speedup_b1: 2, max_perplexity_ratio: 1.15}
```

The teacher is a folder (`model_name_or_path`) or trained from the data by the recipe first (`train_steps` > 0: a
Llama of `layers` x `hidden` for causal LMs, a Marian of `layers` + `layers` for translation, on a tokenizer the
recipe trains on the training split). `check_generation_recipe` refuses, before any stage, whatever cannot work:
unknown keys, values out of range, stage orders that make no sense (training or pruning a deployed model), widths
asked of a translator (its pruning is by depth and vocabulary), drafts that are not distilled PyTorch stages, and
a teacher given twice or not at all. The model-dependent checks (head counts the config cannot save, vocabularies,
tokenizers a draft cannot assist with) run in tasks/compression/generation_flow.py, also before the first stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hf_distill.args import KD_LOSSES
from hf_distill.compression.assisted import check_draft_quantization
from hf_distill.compression.recipe import TEACHER, StagedRecipe, TrainingDefaults, _build, _check_values

__all__ = [
    "GENERATION_TASKS",
    "AssistedSpec",
    "GenerationData",
    "GenerationDistillStage",
    "GenerationPruneStage",
    "GenerationQuantizeStage",
    "GenerationRecipe",
    "GenerationTargets",
    "GenerationTeacher",
    "check_generation_recipe",
    "generation_recipe_from_mapping",
    "generation_stage_reference",
]

CAUSAL_LM, TRANSLATION = "causal_lm", "translation"
GENERATION_TASKS = (CAUSAL_LM, TRANSLATION)
DEPTH_CHOICES = ("uniform", "importance")
KD_SOURCES = ("live", "fused", "cached")
RUNTIME_CHOICES = ("ctranslate2",)
QUANTIZATION_CHOICES = ("int8", "int8_float32", "int16", "float32")


@dataclass(kw_only=True)
class GenerationData:
    """Text to learn from and to measure on."""

    bbc_text: bool = (
        False  # the BBC News articles (demo extra); translation: their sentences, rewritten synthetically
    )
    train_file: str | None = None  # causal_lm: CSV / JSON lines with `text`; translation: JSON lines of pairs
    validation_file: str | None = None
    test_file: str | None = None
    source_lang: str = "en"  # translation: the keys of {"translation": {source_lang: ..., target_lang: ...}}
    target_lang: str = "xx"
    block_size: int = 128  # tokens per training block (causal_lm), longest sentence in tokens (translation)
    max_train_blocks: int | None = None  # use only the first N training blocks / pairs
    max_articles: int | None = None  # bbc_text: use only the first N articles of each split (smoke runs)
    eval_blocks: int = 64  # held-out blocks for perplexity, or test sentences for BLEU
    calibration_blocks: int = 32  # training blocks that measure importance for pruning
    prompts: int = (
        8  # fixed prompts (test text) for the speed measurement; batch sizes 1 and 8 use the first ones
    )
    prompt_tokens: int = 32
    new_tokens: int = 64
    measure_memory: bool = True  # peak memory per model, each in a fresh process (a few seconds each)
    # CPU threads for the report's timings (default: training.num_threads). The report keeps every model loaded in
    # one process to time them in alternating rounds; with 2+ threads, PyTorch's and CTranslate2's thread pools
    # slow each other there (docs/GENERATION.md, "Threads"), so the demos time at 1 thread, every model alike.
    timing_threads: int | None = None


@dataclass(kw_only=True)
class GenerationTeacher:
    """The teacher: a folder, or (`train_steps` > 0) a model trained from scratch on the training split first."""

    model_name_or_path: str | None = None
    train_steps: int = 0
    vocab_size: int = 4096  # the tokenizer the recipe trains (byte-level BPE; Unigram for translation)
    layers: int = 8  # decoder layers (causal_lm), encoder and decoder layers each (translation)
    hidden: int = 512
    heads: int = 8
    kv_heads: int | None = None  # grouped-query attention (causal_lm); None = one per head
    intermediate: int = 1024
    learning_rate: float = 1e-3
    batch_size: int = 16


@dataclass(kw_only=True)
class GenerationPruneStage:
    """Structured pruning of a causal LM (heads or whole key/value groups, FFN neurons, hidden width, depth by
    block importance or uniformly) or of a translator's depth (encoder / decoder layers); `vocab: data` keeps the
    tokens of the training split, the prompts and every special token."""

    name: str
    source: str | None = None
    heads: float = 0.0
    ffn: float = 0.0
    hidden: int | None = None
    layers: int | None = None
    depth: str = (
        "importance"  # which layers `layers` keeps: by block importance (Minitron, ShortGPT) or uniform
    )
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    vocab: str | None = None


@dataclass(kw_only=True)
class GenerationDistillStage:
    """Distil the `from` model from `teacher` with DistillationTrainer on the training split; alpha 0 trains on
    the labels alone (the baseline a KD draft is compared with)."""

    name: str
    source: str | None = None
    teacher: str = TEACHER
    max_steps: int = 200
    learning_rate: float | None = None
    temperature: float | None = None
    alpha: float | None = None
    kd_loss: str = "forward_kl"
    kd_source: str = "live"  # live teacher logits, the fused LM-head loss, or a cache of the teacher's top-k
    cache_top_k: int = 64
    lmbda: float = 0.0  # causal_lm: fraction of steps on completions the student samples (on-policy, GKD)
    seq_kd: bool = False  # translation: train on the teacher's greedy translations (sequence-level KD)


@dataclass(kw_only=True)
class GenerationQuantizeStage:
    """Export the `from` model to a generation runtime with a KV cache (CTranslate2), weights in `quantization`."""

    name: str
    source: str | None = None
    runtime: str = "ctranslate2"
    quantization: str = "int8"


@dataclass(kw_only=True)
class AssistedSpec:
    """Assisted decoding of the teacher (PyTorch, greedy, batch 1) by a distilled draft, against a draft of the
    same size and budget trained on the labels alone."""

    draft: str | None = None
    labels_only: str | None = None
    num_assistant_tokens: int = 5
    schedule: str = "constant"  # transformers' num_assistant_tokens_schedule: constant, heuristic
    prompts: int | None = None  # default: data.prompts
    new_tokens: int | None = None  # default: data.new_tokens
    # the draft stops proposing below this top-token probability; None: transformers' default (0.4, then tuned)
    confidence_threshold: float | None = None
    # both drafts' Linear layers quantized at load time: dynamic_int8 (assisted.quantize_draft); None: float32
    draft_quantization: str | None = None


@dataclass(kw_only=True)
class GenerationTargets:
    """What the final stage (and the draft) should reach; the report prints each as met or missed."""

    max_size_pct: float | None = None  # size on disk, % of the teacher's (PyTorch float32)
    min_speedup_b1: float | None = None  # decode tokens/s at batch 1 over the teacher in PyTorch float32
    min_runtime_speedup_b1: float | None = None  # ... over the teacher in the final stage's runtime
    max_perplexity_ratio: float | None = None  # held-out perplexity over the teacher's (causal_lm)
    min_retained_pct: float | None = None  # BLEU, % of the teacher's (translation)
    min_sentences_speedup: float | None = (
        None  # sentences/s over the teacher in PyTorch float32 (translation)
    )
    min_assisted_speedup: float | None = None  # the teacher's greedy tokens/s with the draft over without


GENERATION_STAGE_TYPES: dict[str, type] = {
    "prune": GenerationPruneStage,
    "distill": GenerationDistillStage,
    "quantize": GenerationQuantizeStage,
}
GenerationStage = GenerationPruneStage | GenerationDistillStage | GenerationQuantizeStage

GENERATION_KEY_HELP = {
    "depth": f"one of {DEPTH_CHOICES}: which `layers` a depth pruning keeps (block importance or spread evenly)",
    "encoder_layers": "translation: new encoder depth (create_student's uniform choice)",
    "decoder_layers": "translation: new decoder depth (a shallow decoder is what speeds decoding up)",
    "vocab": "`data`: keep the training split's tokens, the prompts' and the special tokens",
    "max_steps": "optimizer steps of the stage",
    "kd_source": f"one of {KD_SOURCES}: live teacher logits, fused LM-head loss, or a top-k logit cache",
    "cache_top_k": "kd_source cached: the teacher's top-k log-probabilities kept per position",
    "lmbda": "causal_lm: fraction of on-policy steps (the student's own samples scored by the teacher), in [0, 1]",
    "seq_kd": "translation: learn the teacher's greedy translations instead of the references",
    "runtime": f"one of {RUNTIME_CHOICES}",
    "quantization": f"one of {QUANTIZATION_CHOICES}: the deployed weights",
}


def generation_stage_reference() -> str:
    """The generation recipes' stage types and keys with defaults, as `compress.py --help` lists them."""
    from hf_distill.compression.recipe import STAGE_KEY_HELP

    lines = ["generation recipes (task: causal_lm or translation; docs/GENERATION.md), stage types:"]
    for kind, cls in GENERATION_STAGE_TYPES.items():
        lines.append(f"  {kind}: {(cls.__doc__ or '').split(chr(10))[0].strip()}")
        for item in dataclasses.fields(cls):
            default = item.default if item.default is not dataclasses.MISSING else "required"
            key = "from" if item.name == "source" else item.name
            help_text = GENERATION_KEY_HELP.get(item.name, STAGE_KEY_HELP.get(item.name, ""))
            lines.append(f"      {key} ({default}): {help_text}")
    return "\n".join(lines)


@dataclass(kw_only=True)
class GenerationRecipe(StagedRecipe):
    task: str
    data: GenerationData
    teacher: GenerationTeacher
    training: TrainingDefaults = field(default_factory=TrainingDefaults)
    stages: list[GenerationStage] = field(default_factory=list)
    final: str | None = None
    assisted: AssistedSpec = field(default_factory=AssistedSpec)
    targets: GenerationTargets = field(default_factory=GenerationTargets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "data": dataclasses.asdict(self.data),
            "teacher": dataclasses.asdict(self.teacher),
            "training": dataclasses.asdict(self.training),
            "stages": self.stage_dicts(GENERATION_STAGE_TYPES),
            "final": self.final_stage,
            "assisted": dataclasses.asdict(self.assisted),
            "targets": dataclasses.asdict(self.targets),
        }


_SECTIONS = ("task", "data", "teacher", "training", "stages", "final", "assisted", "targets")


def generation_recipe_from_mapping(values: dict[str, Any]) -> GenerationRecipe:
    values = dict(values or {})
    unknown = sorted(set(values) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {unknown}; the sections are {', '.join(_SECTIONS)}.")
    task = values.get("task")
    if task not in GENERATION_TASKS:
        raise ValueError(f"task: {task!r}; a generation recipe's task is one of {list(GENERATION_TASKS)}.")

    def section(name: str) -> Any:
        return {} if values.get(name) is None else values[name]

    stages = values.get("stages") or []
    if not isinstance(stages, list):
        raise ValueError(f"recipe: stages must be a list of stages, got {type(stages).__name__}.")
    built = []
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ValueError(
                f"stage {index + 1}: {stage!r} is not a mapping; write e.g. `- {{type: prune, layers: 4}}`."
            )
        stage = dict(stage)
        kind = stage.pop("type", None)
        where = f"stage {index + 1} ({stage.get('name', 'unnamed')})"
        if kind not in GENERATION_STAGE_TYPES:
            raise ValueError(
                f"{where}: type {kind!r} is not a stage type; use one of {sorted(GENERATION_STAGE_TYPES)}."
            )
        if "from" in stage:
            stage["source"] = stage.pop("from")
        stage.setdefault("name", f"{kind}_{index + 1}")
        built.append(_build(GENERATION_STAGE_TYPES[kind], stage, where))
    return GenerationRecipe(
        task=task,
        data=_build(GenerationData, section("data"), "data"),
        teacher=_build(GenerationTeacher, section("teacher"), "teacher"),
        training=_build(TrainingDefaults, section("training"), "training"),
        stages=built,
        final=values.get("final"),
        assisted=_build(AssistedSpec, section("assisted"), "assisted"),
        targets=_build(GenerationTargets, section("targets"), "targets"),
    )


# Ranges of the keys recipe.py's `_RANGES` does not know (same rule: checked before any stage runs).
_POSITIVE = (
    "block_size", "eval_blocks", "calibration_blocks", "max_articles", "prompts", "prompt_tokens", "vocab_size", "heads", "kv_heads",
    "intermediate", "max_steps", "cache_top_k", "num_assistant_tokens", "max_train_blocks", "encoder_layers",
    "decoder_layers", "timing_threads",
)  # fmt: skip


def _check_ranges(section: Any, where: str) -> None:
    _check_values(section, where)
    for key in _POSITIVE:
        value = getattr(section, key, None)
        is_count = any(item.name == key and "int" in str(item.type) for item in dataclasses.fields(section))
        if is_count and value is not None and value < 1:
            raise ValueError(f"{where}: {key}: {value!r} must be >= 1.")
    new_tokens = getattr(section, "new_tokens", None)
    if new_tokens is not None and new_tokens < 2:
        raise ValueError(
            f"{where}: new_tokens: {new_tokens!r} must be >= 2 (decode speed is timed after the first)."
        )
    for key in ("lmbda",):
        value = getattr(section, key, None)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{where}: {key}: {value!r} must be in [0, 1] (the fraction of on-policy steps)."
            )


def _choice(stage: Any, key: str, choices: tuple[str, ...]) -> None:
    if getattr(stage, key) not in choices:
        raise ValueError(f"stage {stage.name}: {key}: {getattr(stage, key)!r}; use one of {list(choices)}.")


def _check_prune(recipe: GenerationRecipe, stage: GenerationPruneStage) -> None:
    for key in ("heads", "ffn"):
        value = getattr(stage, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(
                f"stage {stage.name}: {key}: {value!r} is the fraction removed; it must be in [0, 1)."
            )
    _choice(stage, "depth", DEPTH_CHOICES)
    if stage.vocab not in (None, "data"):
        raise ValueError(f"stage {stage.name}: vocab: {stage.vocab!r}; use vocab: data or leave it out.")
    if recipe.task == TRANSLATION:
        widths = [
            key for key in ("heads", "ffn", "hidden", "layers") if getattr(stage, key) not in (None, 0, 0.0)
        ]
        if widths:
            raise ValueError(
                f"stage {stage.name}: {widths} prune a decoder-only model; a translator is pruned by depth "
                "(encoder_layers, decoder_layers) and vocabulary (vocab: data)."
            )
    elif stage.encoder_layers is not None or stage.decoder_layers is not None:
        raise ValueError(
            f"stage {stage.name}: encoder_layers / decoder_layers are for translators; a causal LM's depth is `layers`."
        )


def check_generation_recipe(recipe: GenerationRecipe) -> None:
    """Raise ValueError for a generation recipe that cannot work, before any stage runs."""
    if not recipe.stages:
        raise ValueError("recipe: no stages; add e.g. `stages: [{type: prune, layers: 4}, {type: distill}]`.")
    for section, where in (
        (recipe.data, "data"),
        (recipe.teacher, "teacher"),
        (recipe.training, "training"),
        (recipe.assisted, "assisted"),
        (recipe.targets, "targets"),
    ):
        _check_ranges(section, where)
    teacher = recipe.teacher
    if (teacher.model_name_or_path is None) == (teacher.train_steps == 0):
        raise ValueError(
            "teacher: give either model_name_or_path (a trained model) or train_steps > 0 (the recipe trains one "
            f"from the data first), not {'both' if teacher.train_steps else 'neither'}."
        )
    data = recipe.data
    if not data.bbc_text and (data.train_file is None or data.test_file is None):
        raise ValueError(
            "data: give train_file and test_file (the report measures on the test split), or bbc_text: true."
        )
    if data.prompt_tokens >= data.block_size:
        raise ValueError(
            f"data: prompt_tokens ({data.prompt_tokens}) must be below block_size ({data.block_size})."
        )
    kinds: dict[str, str] = {TEACHER: "model"}
    previous = TEACHER
    for stage in recipe.stages:
        where = f"stage {stage.name}"
        if stage.name in kinds:
            raise ValueError(
                f"stage name {stage.name!r} is used twice (or is 'teacher'); give each stage its own name."
            )
        _check_ranges(stage, where)
        stage.source = previous if stage.source is None else stage.source
        if stage.source not in kinds:
            raise ValueError(
                f"{where}: from: {stage.source!r} is not the teacher or an earlier stage; earlier stages: "
                f"{[name for name in kinds if name != TEACHER]}."
            )
        if kinds[stage.source] == "deployed":
            raise ValueError(
                f"{where}: its input {stage.source!r} is a deployed runtime folder; prune, distil or export a PyTorch "
                "stage instead (put quantize stages last)."
            )
        if isinstance(stage, GenerationPruneStage):
            _check_prune(recipe, stage)
        elif isinstance(stage, GenerationDistillStage):
            _choice(stage, "kd_loss", KD_LOSSES)
            _choice(stage, "kd_source", KD_SOURCES)
            if stage.teacher not in kinds or kinds[stage.teacher] == "deployed":
                raise ValueError(
                    f"{where}: teacher: {stage.teacher!r} is not the teacher or an earlier PyTorch stage."
                )
            if stage.teacher == stage.source:
                raise ValueError(
                    f"{where}: the student (from: {stage.source}) and the teacher are the same model."
                )
            if stage.lmbda > 0 and recipe.task != CAUSAL_LM:
                raise ValueError(
                    f"{where}: lmbda (on-policy steps) is for causal LMs; use seq_kd for translation."
                )
            if stage.seq_kd and recipe.task != TRANSLATION:
                raise ValueError(
                    f"{where}: seq_kd is for translation; for a causal LM use lmbda (on-policy)."
                )
            if stage.lmbda > 0 and stage.kd_source != "live":
                raise ValueError(
                    f"{where}: on-policy steps (lmbda > 0) need the live teacher (kd_source: live)."
                )
        else:
            _choice(stage, "runtime", RUNTIME_CHOICES)
            _choice(stage, "quantization", QUANTIZATION_CHOICES)
        kinds[stage.name] = "deployed" if isinstance(stage, GenerationQuantizeStage) else "model"
        previous = stage.name
    if recipe.final is not None and recipe.final not in kinds:
        raise ValueError(
            f"final: {recipe.final!r} is not a stage; the stages are {[s.name for s in recipe.stages]}."
        )
    _check_assisted(recipe, kinds)


def _check_assisted(recipe: GenerationRecipe, kinds: dict[str, str]) -> None:
    assisted = recipe.assisted
    if assisted.schedule not in ("constant", "heuristic", "heuristic_transient"):
        raise ValueError(
            f"assisted: schedule: {assisted.schedule!r}; use constant, heuristic or heuristic_transient."
        )
    threshold = assisted.confidence_threshold
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"assisted: confidence_threshold: {threshold!r} must be in [0, 1) (0: never stop early)."
        )
    check_draft_quantization(assisted.draft_quantization, "assisted: draft_quantization")
    for key in ("draft", "labels_only"):
        name = getattr(assisted, key)
        if name is None:
            continue
        if recipe.task != CAUSAL_LM:
            raise ValueError(f"assisted: {key}: drafts assist causal LMs here; remove the assisted section.")
        if name not in kinds or kinds[name] != "model" or name == TEACHER:
            raise ValueError(
                f"assisted: {key}: {name!r} must name a PyTorch stage of this recipe (a distilled draft), not "
                "the teacher or a deployed folder: transformers' assistant_model is a PyTorch model."
            )
    if assisted.labels_only is not None and assisted.draft is None:
        raise ValueError("assisted: labels_only is the baseline of a draft; name the draft too (draft: ...).")
