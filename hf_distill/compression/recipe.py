"""A compression recipe: the teacher, the data and an ordered list of stages (prune, distill, quantize).

A recipe is one YAML file (or the same keys given as flags to scripts/compress.py):

```yaml
data: {bbc_demo: true, max_seq_length: 128}          # or train_file / validation_file / test_file
teacher: {model_name_or_path: path/to/teacher, finetune_epochs: 0}
training: {batch_size: 16, learning_rate: 2.0e-4, temperature: 2.0, alpha: 0.5, seed: 42}
stages:
  - {name: pruned, type: prune, heads: 0.5, ffn: 0.5, hidden: 192, layers: 3, vocab: data}
  - {name: distilled, type: distill, epochs: 3, hidden_weight: 1.0}
  - {name: int8, type: quantize, method: qat, epochs: 1}
final: int8
```

Each stage reads the model of the stage named by `from` (default: the stage before it; `teacher` is the
teacher) and writes its own folder. Distillation stages learn from `teacher` (default: the teacher; name an
earlier stage to distil through an assistant, Mirzadeh et al., 2020). Everything that cannot work is found by
`check_recipe` before any stage runs: unknown keys, stage types and methods, values of the wrong type or out of
range (`_RANGES`: a temperature <= 0, alpha outside [0, 1], a negative learning rate or loss weight; 0 is kept where
it is valid, as for a learning rate), references to stages that do not exist yet, and orders that make no sense
(pruning or distilling a quantized model, quantizing twice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_distill.args import KD_LOSSES
from hf_distill.losses.features import ATTENTION_HEAD_MAPPINGS

__all__ = [
    "DataSpec",
    "DistillStage",
    "PruneStage",
    "QuantizeStage",
    "Recipe",
    "Targets",
    "TeacherSpec",
    "TrainingDefaults",
    "check_recipe",
    "load_recipe",
    "parse_stage_flag",
]

TEACHER = "teacher"
QUANTIZATION_METHODS = ("ptq", "qat")
VOCABULARY_CHOICES = ("data",)


@dataclass(kw_only=True)
class DataSpec:
    """The classification data: the demo's BBC News split, or CSV/JSON files as in run_glue.py."""

    bbc_demo: bool = False  # write the demo's BBC News train/validation/test split into <output_dir>/data
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None  # the held-out split the report measures on (needs labels)
    max_seq_length: int = 128
    calibration_examples: int = 256  # training examples that measure importance for pruning


@dataclass(kw_only=True)
class TeacherSpec:
    """The teacher; with `finetune_epochs` > 0 it is first fine-tuned on the data (scripts/train_teacher.py)."""

    model_name_or_path: str
    finetune_epochs: float = 0.0
    finetune_learning_rate: float = 1e-4


@dataclass(kw_only=True)
class TrainingDefaults:
    """Settings every training stage shares unless the stage sets its own."""

    batch_size: int = 16
    learning_rate: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5
    seed: int = 42
    num_threads: int | None = None  # CPU threads for training and timing (default: torch's)
    latency_repeats: int = 10  # alternating rounds per model and batch size in the report's timing


@dataclass(kw_only=True)
class PruneStage:
    """Structured pruning (hf_distill.compression.pruning): fractions of heads and FFN neurons removed per layer, a target
    hidden width and layer count, and `vocab: data` to keep only the tokens the training split uses."""

    name: str
    source: str | None = None  # "from" in the YAML
    heads: float = 0.0
    ffn: float = 0.0
    hidden: int | None = None
    layers: int | None = None
    vocab: str | None = None


@dataclass(kw_only=True)
class DistillStage:
    """Distil the `from` model (the student) from `teacher` with DistillationTrainer."""

    name: str
    source: str | None = None
    teacher: str = TEACHER
    epochs: float = 3.0
    learning_rate: float | None = None
    temperature: float | None = None
    alpha: float | None = None
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    attention_head_mapping: str = "per_head"
    kd_loss: str = "forward_kl"


@dataclass(kw_only=True)
class QuantizeStage:
    """INT8 for CPU deployment in ONNX Runtime: `ptq` quantizes the `from` model as it is; `qat` first distils
    it from `teacher` with fake-quantized weights and activations (hf_distill.compression.qat), then quantizes."""

    name: str
    source: str | None = None
    method: str = "ptq"
    per_channel: bool = True
    teacher: str = TEACHER
    epochs: float = 1.0
    learning_rate: float | None = None
    temperature: float | None = None
    alpha: float | None = None
    hidden_weight: float = 0.0


@dataclass(kw_only=True)
class Targets:
    """What the final stage should reach against the teacher; the report prints each as met or missed."""

    min_retained_pct: float | None = None  # task metric, % of the teacher's
    max_size_pct: float | None = None  # size on disk, % of the teacher's
    min_speedup_b32: float | None = None  # throughput at batch 32 against the teacher in PyTorch float32


STAGE_TYPES: dict[str, type] = {"prune": PruneStage, "distill": DistillStage, "quantize": QuantizeStage}

# What each stage key means, for `scripts/compress.py --help` (keys common to every stage: name, from).
STAGE_KEY_HELP = {
    "name": "the stage's folder name under <output_dir>/stages (default: its type and position)",
    "source": "`from` in YAML: the stage whose model this one starts from (default: the one before; `teacher`)",
    "heads": "fraction of attention heads removed per layer, in [0, 1) (whole key/value groups under GQA)",
    "ffn": "fraction of FFN neurons removed per layer, in [0, 1)",
    "hidden": "new hidden width (embedding channels, through every layer and norm)",
    "layers": "new depth (create_student's uniform choice of layers)",
    "vocab": "`data`: keep only the tokens of the training split (every word truncation cuts kept whole)",
    "teacher": "the stage (or `teacher`) this stage distils from: an earlier stage makes it an assistant",
    "epochs": "training epochs",
    "learning_rate": "learning rate (default: training.learning_rate; 0 is honoured)",
    "temperature": "KD temperature, > 0 (default: training.temperature)",
    "alpha": "weight of the KD term in [0, 1] (default: training.alpha)",
    "hidden_weight": "weight of hidden-state matching (learned projections when widths differ)",
    "attention_weight": "weight of attention-map matching",
    "attention_head_mapping": f"one of {ATTENTION_HEAD_MAPPINGS}: `mean` when the student has fewer heads",
    "kd_loss": f"one of {KD_LOSSES}",
    "method": f"one of {QUANTIZATION_METHODS}: `qat` distils with fake quantization first",
    "per_channel": "one weight scale per output channel (true) or per tensor",
}


def stage_reference() -> str:
    """The stage types and their keys with defaults, as `--help` lists them."""
    lines = ['stage types (YAML `stages:` entries or --stage "type:key=value,..."):']
    for kind, cls in STAGE_TYPES.items():
        lines.append(f"  {kind}: {(cls.__doc__ or '').split(chr(10))[0].strip()}")
        for stage_field in dataclasses.fields(cls):
            default = stage_field.default if stage_field.default is not dataclasses.MISSING else "required"
            key = "from" if stage_field.name == "source" else stage_field.name
            lines.append(f"      {key} ({default}): {STAGE_KEY_HELP.get(stage_field.name, '')}")
    return "\n".join(lines)


Stage = PruneStage | DistillStage | QuantizeStage


class StagedRecipe:
    """What every recipe of stages answers (classifier and generation recipes share it): a stage by name, the
    stage the report ends with, and the stages as the YAML mappings they were read from."""

    stages: list[Any]
    final: str | None

    def stage(self, name: str) -> Any:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def final_stage(self) -> str:
        return self.stages[-1].name if self.final is None else self.final

    def stage_dicts(self, stage_types: dict[str, type]) -> list[dict[str, Any]]:
        dicts = []
        for stage in self.stages:
            values = dataclasses.asdict(stage)
            values["from"] = values.pop("source")
            kind = next(key for key, cls in stage_types.items() if isinstance(stage, cls))
            dicts.append({"name": values.pop("name"), "type": kind, **values})
        return dicts


@dataclass(kw_only=True)
class Recipe(StagedRecipe):
    data: DataSpec
    teacher: TeacherSpec
    training: TrainingDefaults = field(default_factory=TrainingDefaults)
    stages: list[Stage] = field(default_factory=list)
    final: str | None = None  # the stage the report ends with (default: the last one)
    targets: Targets = field(default_factory=Targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": dataclasses.asdict(self.data),
            "teacher": dataclasses.asdict(self.teacher),
            "training": dataclasses.asdict(self.training),
            "stages": self.stage_dicts(STAGE_TYPES),
            "final": self.final_stage,
            "targets": dataclasses.asdict(self.targets),
        }


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {values!r}.")
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {sorted(known)}.")
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise ValueError(f"{where}: {error}") from None


def _stage_from_mapping(values: dict[str, Any], index: int) -> Stage:
    if not isinstance(values, dict):
        raise ValueError(
            f"stage {index + 1}: {values!r} is not a mapping; write e.g. `- {{name: pruned, type: prune, heads: 0.5}}`."
        )
    values = dict(values)
    kind = values.pop("type", None)
    where = f"stage {index + 1} ({values.get('name', 'unnamed')})"
    if kind not in STAGE_TYPES:
        raise ValueError(f"{where}: type {kind!r} is not a stage type; use one of {sorted(STAGE_TYPES)}.")
    if "from" in values:
        values["source"] = values.pop("from")
    values.setdefault("name", f"{kind}_{index + 1}")
    return _build(STAGE_TYPES[kind], values, where)


def recipe_from_mapping(values: dict[str, Any]) -> Recipe:
    """A Recipe from the YAML's mapping (see the module docstring for the keys)."""
    values = dict(values or {})
    task = values.pop("task", None)
    if task not in (None, "classification"):
        raise ValueError(
            f"task: {task!r}: this recipe reader is for classifiers; causal_lm and translation recipes are read by "
            "hf_distill.compression.generation_recipe (scripts/compress.py chooses by `task`)."
        )
    unknown = sorted(set(values) - {"data", "teacher", "training", "stages", "final", "targets"})
    if unknown:
        raise ValueError(
            f"recipe: unknown section(s) {unknown}; the sections are data, teacher, training, stages, final, targets."
        )
    if "teacher" not in values:
        raise ValueError("recipe: no teacher; add `teacher: {model_name_or_path: ...}`.")

    # An empty section (`training:` with nothing under it) is None in YAML: the section's defaults. Any other value
    # is passed on, so that `stages: 0` or `data: 5` is refused rather than read as empty.
    def section(name: str, empty: Any) -> Any:
        return empty if values.get(name) is None else values[name]

    stages = section("stages", [])
    if not isinstance(stages, list):
        raise ValueError(f"recipe: stages must be a list of stages, got {type(stages).__name__}.")
    return Recipe(
        data=_build(DataSpec, section("data", {}), "data"),
        teacher=_build(TeacherSpec, values["teacher"], "teacher"),
        training=_build(TrainingDefaults, section("training", {}), "training"),
        stages=[_stage_from_mapping(stage, index) for index, stage in enumerate(stages)],
        final=values.get("final"),
        targets=_build(Targets, section("targets", {}), "targets"),
    )


def load_recipe(path: str | Path) -> Recipe:
    with open(path, encoding="utf-8") as handle:
        return recipe_from_mapping(yaml.safe_load(handle))


def parse_stage_flag(text: str) -> dict[str, Any]:
    """`--stage "prune:heads=0.5,hidden=192,vocab=data"` -> {"type": "prune", "heads": 0.5, ...}.

    Values are read as YAML scalars (numbers, booleans, strings)."""
    kind, _, rest = text.partition(":")
    values: dict[str, Any] = {"type": kind.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(
                f"--stage {text!r}: {item!r} is not key=value; write e.g. 'prune:heads=0.5,ffn=0.5'."
            )
        values[key.strip()] = yaml.safe_load(value)
    return values


# The numeric settings' valid ranges, by name (a name means the same in every section and stage): what the value
# must satisfy, and the message's reason when it does not. Checked before any stage runs: a training stage would
# otherwise refuse it after the stages before it have run for an hour.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (
        lambda v: v > 0,
        "must be > 0: the logits are divided by it before the softmax (1 leaves them)",
    ),
    "alpha": (
        lambda v: 0 <= v <= 1,
        "must be in [0, 1]: the weight of the distillation loss, 1 - alpha the task's",
    ),
    "learning_rate": (lambda v: v >= 0, "must be >= 0"),
    "finetune_learning_rate": (lambda v: v >= 0, "must be >= 0"),
    "finetune_epochs": (lambda v: v >= 0, "must be >= 0 (0 uses the teacher as it is)"),
    "hidden_weight": (lambda v: v >= 0, "must be >= 0 (0 turns hidden-state matching off)"),
    "attention_weight": (lambda v: v >= 0, "must be >= 0 (0 turns attention matching off)"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "latency_repeats": (lambda v: v >= 1, "must be >= 1"),
    "num_threads": (lambda v: v >= 1, "must be >= 1 (leave it out for torch's default)"),
    "max_seq_length": (lambda v: v >= 2, "must be >= 2 (room for the special tokens and one more)"),
    "calibration_examples": (lambda v: v >= 1, "must be >= 1"),
    "hidden": (lambda v: v >= 1, "must be a positive width, e.g. 192"),
    "layers": (lambda v: v >= 1, "must be a positive layer count"),
    "min_retained_pct": (lambda v: v >= 0, "must be >= 0 (a percentage of the teacher's metric)"),
    "max_size_pct": (lambda v: v > 0, "must be > 0 (a percentage of the teacher's size)"),
    "min_speedup_b32": (lambda v: v > 0, "must be > 0 (a throughput ratio against the teacher)"),
}
_TYPE_NAMES = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}


def _check_values(section: Any, where: str) -> None:
    """Check every field of a recipe dataclass against its annotation (`float`, `int | None`, ...) and `_RANGES`.

    A number written as text (PyYAML reads `2e-4` as a string) is converted; any other value of the wrong type, a
    value out of range, and a missing value where the field has no default meaning (None) are errors."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        allowed = [part.strip() for part in str(item.type).split("|")]
        if value is None:
            if "None" in allowed:
                continue
            raise ValueError(f"{where}: {item.name}: null must be {_TYPE_NAMES[allowed[0]]}.")
        kind = next(part for part in allowed if part != "None")
        if kind in ("float", "int") and isinstance(value, str):
            try:
                value = float(value) if kind == "float" else int(value)
            except ValueError:
                pass
            else:
                setattr(section, item.name, value)
        expected = {"float": (int, float), "int": int, "bool": bool, "str": str}.get(kind)
        wrong_bool = isinstance(value, bool) and kind != "bool"
        if expected is not None and (wrong_bool or not isinstance(value, expected)):
            example = (
                f", e.g. {item.name}: {item.default!r}"
                if item.default not in (None, dataclasses.MISSING)
                else ""
            )
            raise ValueError(f"{where}: {item.name}: {value!r} must be {_TYPE_NAMES[kind]}{example}.")
        if kind == "float" and not math.isfinite(value):
            raise ValueError(f"{where}: {item.name}: {value!r} must be a finite number.")
        if item.name in _RANGES and not _RANGES[item.name][0](value):
            raise ValueError(f"{where}: {item.name}: {value!r} {_RANGES[item.name][1]}.")


def _check_fraction(stage: PruneStage, key: str) -> None:
    value = getattr(stage, key)
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"stage {stage.name}: {key}: {value!r} is the fraction removed and must be in [0, 1); "
            f"e.g. {key}: 0.5 removes half."
        )


def _check_choice(stage: Any, key: str, choices: tuple[str, ...]) -> None:
    if getattr(stage, key) not in choices:
        raise ValueError(f"stage {stage.name}: {key}: {getattr(stage, key)!r}; use one of {list(choices)}.")


def check_recipe(recipe: Recipe) -> None:
    """Raise ValueError for a recipe that cannot work, before any stage runs (the model-dependent checks of
    pruning run in scripts/compress.py on the configs, also before any work)."""
    if not recipe.stages:
        raise ValueError("recipe: no stages; add e.g. `stages: [{type: prune, ...}, {type: distill}]`.")
    for section, where in (
        (recipe.data, "data"),
        (recipe.teacher, "teacher"),
        (recipe.training, "training"),
        (recipe.targets, "targets"),
    ):
        _check_values(section, where)
    data = recipe.data
    if not data.bbc_demo and (data.train_file is None or data.test_file is None):
        raise ValueError(
            "data: give train_file and test_file (the report measures on the test split), or bbc_demo: true."
        )
    kinds: dict[str, str] = {TEACHER: "model"}
    previous = TEACHER
    for stage in recipe.stages:
        if stage.name in kinds:
            raise ValueError(
                f"stage name {stage.name!r} is used twice (or is 'teacher'); give each stage its own name."
            )
        _check_values(stage, f"stage {stage.name}")
        if stage.source is None:
            stage.source = previous
        if stage.source not in kinds:
            raise ValueError(
                f"stage {stage.name}: from: {stage.source!r} is not the teacher or an earlier stage; "
                f"earlier stages: {[name for name in kinds if name != TEACHER]}."
            )
        if kinds[stage.source] == "onnx":
            raise ValueError(
                f"stage {stage.name}: its input {stage.source!r} is already quantized to INT8 (an ONNX file); "
                f"{type(stage).__name__[:-5].lower()} a PyTorch model instead: put quantize stages last."
            )
        if isinstance(stage, PruneStage):
            _check_fraction(stage, "heads")
            _check_fraction(stage, "ffn")
            if stage.vocab is not None and stage.vocab not in VOCABULARY_CHOICES:
                raise ValueError(
                    f"stage {stage.name}: vocab: {stage.vocab!r}; use vocab: data (keep the tokens the training "
                    "split uses) or leave it out."
                )
        if isinstance(stage, QuantizeStage) and stage.method not in QUANTIZATION_METHODS:
            raise ValueError(
                f"stage {stage.name}: method: {stage.method!r} is not a quantization method; use one of "
                f"{list(QUANTIZATION_METHODS)} (post-training, or quantization-aware distillation)."
            )
        if isinstance(stage, DistillStage):
            _check_choice(stage, "kd_loss", KD_LOSSES)
            _check_choice(stage, "attention_head_mapping", ATTENTION_HEAD_MAPPINGS)
        if isinstance(stage, (DistillStage, QuantizeStage)) and (
            isinstance(stage, DistillStage) or stage.method == "qat"
        ):
            if stage.teacher not in kinds:
                raise ValueError(
                    f"stage {stage.name}: teacher: {stage.teacher!r} is not the teacher or an earlier stage."
                )
            if kinds[stage.teacher] == "onnx":
                raise ValueError(
                    f"stage {stage.name}: teacher: {stage.teacher!r} is an INT8 ONNX model; a teacher must be a "
                    "PyTorch model (the teacher or a distilled stage)."
                )
            if stage.teacher == stage.source:
                raise ValueError(
                    f"stage {stage.name}: the student (from: {stage.source}) and the teacher are the same model; "
                    "distil a pruned or smaller model from it."
                )
            if stage.epochs <= 0:
                raise ValueError(f"stage {stage.name}: epochs: {stage.epochs} must be > 0.")
        kinds[stage.name] = "onnx" if isinstance(stage, QuantizeStage) else "model"
        previous = stage.name
    if recipe.final is not None and recipe.final not in kinds:
        raise ValueError(
            f"final: {recipe.final!r} is not a stage; the stages are {[s.name for s in recipe.stages]}."
        )
