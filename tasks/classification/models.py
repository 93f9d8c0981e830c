"""Classification models: matching the data's labels to a model's outputs, and loading the teacher (checked
against the data before anything trains), the student, a model to fine-tune, and the peers of mutual learning."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from hf_distill.tasks.common.arguments import LoadingArguments, ModelArguments
from hf_distill.tasks.common.loading import build_student, freeze_input_embeddings, load_pretrained

logger = logging.get_logger(__name__)

if TYPE_CHECKING:  # classification.py imports this module; the spec is only read here
    from hf_distill.tasks.classification.spec import TaskSpec


# --------------------------------------------------------------------------------------------- labels
def has_named_labels(config: PretrainedConfig) -> bool:
    """False for the LABEL_0, LABEL_1... that transformers assigns when a model was saved without names."""
    return any(config.id2label.get(i) != f"LABEL_{i}" for i in range(config.num_labels))


@dataclass
class LabelAlignment:
    label_to_id: dict[Any, int]  # raw label value -> output index of the model
    id2label: dict[int, str]


def align_labels(spec: TaskSpec, config: PretrainedConfig, role: str = "teacher") -> LabelAlignment:
    """Map the data's labels onto the outputs of a model with `config`.

    A model with named labels keeps its order (data labels are matched by name, then case-insensitively);
    an unnamed one takes the data's sorted order. Raises when the counts or the names differ.
    """
    config_names = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    fix = (
        "pass a teacher fine-tuned on this data (scripts/train_teacher.py fine-tunes one)"
        if role == "teacher"
        else f"pass a {role} whose classification head matches the data"
    )
    if spec.is_regression:
        if config.num_labels != 1:
            raise ValueError(
                f"The {role} has {config.num_labels} labels {config_names}, but the task is regression (1 output); "
                f"{fix}."
            )
        return LabelAlignment({}, {0: config_names[0]})
    if config.num_labels != spec.num_labels:
        raise ValueError(
            f"The {role} has {config.num_labels} labels {config_names}, the data has {spec.describe_labels()}; "
            f"{fix}."
        )
    named = has_named_labels(config)
    if spec.label_names is None:
        # Bare integer labels: value order is output order.
        id2label = (
            dict(enumerate(config_names)) if named else {i: str(v) for i, v in enumerate(spec.label_values)}
        )
        return LabelAlignment({v: i for i, v in enumerate(spec.label_values)}, id2label)
    if not named:
        return LabelAlignment(
            {v: i for i, v in enumerate(spec.label_values)}, dict(enumerate(spec.label_names))
        )
    for normalise in (lambda s: s, str.lower):
        config_ids = {normalise(name): i for i, name in enumerate(config_names)}
        if set(config_ids) == {normalise(n) for n in spec.label_names}:
            label_to_id = {v: config_ids[normalise(n)] for v, n in zip(spec.label_values, spec.label_names)}
            return LabelAlignment(label_to_id, dict(enumerate(config_names)))
    raise ValueError(
        f"The {role}'s labels {config_names} differ from the data's labels {spec.label_names}; {fix}, or rename "
        "the labels in the data to match."
    )


def _set_labels(config: PretrainedConfig, spec: TaskSpec, id2label: Mapping[int, str]) -> None:
    config.num_labels = spec.num_labels
    config.id2label = dict(id2label)
    config.label2id = {name: i for i, name in id2label.items()}
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"


# --------------------------------------------------------------------------------------------- models
def _load_classifier(
    path: str, config: PretrainedConfig, role: str, loading_args: LoadingArguments, **kwargs: Any
) -> tuple[PreTrainedModel, dict[str, Any]]:
    model, info = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        role=role,
        loading_args=loading_args,
        config=config,
        output_loading_info=True,
        **kwargs,
    )
    return model, info


def load_tokenizer(name_or_path: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase:
    return load_pretrained(
        AutoTokenizer,
        loading_args.tokenizer_name or name_or_path,
        role="tokenizer",
        loading_args=loading_args,
    )


@dataclass
class ClassificationModelArguments(ModelArguments):
    """The model flags: one teacher or several (their weights are --teacher_weights) and a student, or, with
    --mutual_learning, two or more peers trained together without a teacher (tasks/mutual_recipe.py)."""

    teacher_model_name_or_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The teacher, or several teachers (`a b c`): Hub names or local directories, each already "
            "fine-tuned on the task with the same labels and tokenizer. Several teachers are distilled as the "
            "weighted mixture of their softened distributions (--teacher_weights); the student is built from, and "
            "its hidden states matched with, the first. Required unless --mutual_learning."
        },
    )
    mutual_learning: bool = field(
        default=False,
        metadata={
            "help": "Deep Mutual Learning: no teacher; two or more peers (--peer_model_name_or_path and/or "
            "--peer_num_layers) train together, each on the task loss plus KD towards the others' predictions. "
            "Every peer is saved in <output_dir>/peer_<k> and evaluated."
        },
    )
    peer_model_name_or_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Peers loaded as they are (`a b`): Hub names or local directories, with one tokenizer; a "
            "model without a classification head gets a new one for the data's labels. They come first (peer 0 "
            "is the first of them)."
        },
    )
    peer_num_layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Peers built with create_student from --peer_base_model_name_or_path, one per value: `3 2` "
            "builds a 3-layer and a 2-layer peer (uniformly chosen layers). They follow the loaded peers."
        },
    )
    peer_base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The pretrained model the --peer_num_layers peers are cut from."},
    )
    previous_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Add classes to this trained classifier (Learning without Forgetting, tasks/classification/"
            "incremental.py): it teaches its own classes and, its head grown by the new ones, is the student. "
            "Takes no teacher or student flags; see --new_labels and --exemplar_file."
        },
    )

    def __post_init__(self):
        if isinstance(self.teacher_model_name_or_path, str):  # one path from a YAML/JSON file or Python
            self.teacher_model_name_or_path = [self.teacher_model_name_or_path]
        if isinstance(self.peer_model_name_or_path, str):
            self.peer_model_name_or_path = [self.peer_model_name_or_path]
        if isinstance(self.peer_num_layers, int):
            self.peer_num_layers = [self.peer_num_layers]
        if self.previous_model_name_or_path is not None:  # the student is the previous model, grown
            flags = (
                "teacher_model_name_or_path student_model_name_or_path student_num_layers student_layers "
                "mutual_learning peer_model_name_or_path peer_num_layers peer_base_model_name_or_path"
            ).split()
            given = [f"--{flag}" for flag in flags if getattr(self, flag) not in (None, [], False)]
            if given:
                raise ValueError(
                    f"--previous_model_name_or_path is both the teacher (of the old classes) and the student (grown by "
                    f"the new ones); drop {', '.join(given)}."
                )
            return
        if self.mutual_learning:
            self._check_peers()
            return  # no teacher and no student: the student flags' checks do not apply
        peer_flags = [
            flag
            for flag, value in (
                ("--peer_model_name_or_path", self.peer_model_name_or_path),
                ("--peer_num_layers", self.peer_num_layers),
                ("--peer_base_model_name_or_path", self.peer_base_model_name_or_path),
            )
            if value
        ]
        if peer_flags:
            raise ValueError(f"{', '.join(peer_flags)} set without --mutual_learning: add it to train peers.")
        if not self.teacher_model_name_or_path:
            raise ValueError(
                "--teacher_model_name_or_path needs at least one teacher (or pass --mutual_learning with peers to "
                "train without one)."
            )
        super().__post_init__()

    @property
    def peer_count(self) -> int:
        return len(self.peer_model_name_or_path) + len(self.peer_num_layers)

    def _check_peers(self) -> None:
        if self.teacher_model_name_or_path:
            raise ValueError(
                f"--mutual_learning trains peers without a teacher, but --teacher_model_name_or_path "
                f"{self.teacher_model_name_or_path} is set: drop --teacher_model_name_or_path to train peers (pass "
                "a model as --peer_model_name_or_path to make it a peer), or drop --mutual_learning to distil."
            )
        student_flags = [
            flag
            for flag, value in (
                ("--student_model_name_or_path", self.student_model_name_or_path),
                ("--student_num_layers", self.student_num_layers),
                ("--student_layers", self.student_layers),
            )
            if value is not None
        ]
        if student_flags:
            raise ValueError(
                f"--mutual_learning has peers, not a student: drop {', '.join(student_flags)} and use "
                "--peer_model_name_or_path / --peer_num_layers."
            )
        if self.peer_num_layers and self.peer_base_model_name_or_path is None:
            raise ValueError(
                f"--peer_num_layers {self.peer_num_layers} builds peers from a pretrained model: pass it as "
                "--peer_base_model_name_or_path."
            )
        if self.peer_base_model_name_or_path is not None and not self.peer_num_layers:
            raise ValueError(
                "--peer_base_model_name_or_path is set without --peer_num_layers: give one layer count per peer "
                "to build from it (e.g. `--peer_num_layers 3 2`)."
            )
        if any(layers < 1 for layers in self.peer_num_layers):
            raise ValueError(f"peer_num_layers must all be >= 1, got {self.peer_num_layers}.")
        if self.peer_count < 2:
            raise ValueError(
                f"mutual learning needs at least two peers, got {self.peer_count} "
                f"(--peer_model_name_or_path {self.peer_model_name_or_path}, --peer_num_layers "
                f"{self.peer_num_layers}); add peers to either flag."
            )


def teacher_paths(model_args: ModelArguments) -> list[str]:
    """--teacher_model_name_or_path as a list (one path, or several)."""
    paths = model_args.teacher_model_name_or_path
    return [paths] if isinstance(paths, str) else list(paths)


@dataclass
class DistillationModels:
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    label_to_id: dict[Any, int]
    # A fresh student on each call, initialised the same way (from the teacher, or loaded under the run's seed).
    make_student: Callable[[], PreTrainedModel]
    # path -> model of every teacher, the first being `teacher` (one entry with a single teacher).
    teachers: dict[str, PreTrainedModel] = field(default_factory=dict)

    @property
    def teacher_argument(self) -> PreTrainedModel | dict[str, PreTrainedModel]:
        """What DistillationTrainer takes as teacher_model: the model, or the path -> model dict."""
        return self.teacher if len(self.teachers) <= 1 else dict(self.teachers)


def load_distillation_models(model_args: ModelArguments, spec: TaskSpec) -> DistillationModels:
    """Teacher, tokenizer and student factory, with the teacher checked against the data first.

    Errors (before training): label count or names differ, the teacher has no trained head, a model
    cannot be found offline.
    """
    teacher_path, *other_paths = teacher_paths(model_args)
    teacher_config = load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)
    teacher_alignment = align_labels(spec, teacher_config, role="teacher")

    # Data labels are encoded in the student's output order: the trainer reorders the teacher's logits.
    student_config = None
    student_alignment = teacher_alignment
    if model_args.student_model_name_or_path is not None:
        student_config = load_pretrained(
            AutoConfig, model_args.student_model_name_or_path, role="student", loading_args=model_args
        )
        if student_config.num_labels == spec.num_labels and has_named_labels(student_config):
            student_alignment = align_labels(spec, student_config, role="student")

    if not has_named_labels(teacher_config):
        _set_labels(teacher_config, spec, teacher_alignment.id2label)
    teacher_config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    tokenizer = load_tokenizer(teacher_path, model_args)
    teacher, info = _load_classifier(teacher_path, teacher_config, "teacher", model_args)
    if info.get("missing_keys"):
        raise ValueError(
            f"The teacher {teacher_path!r} has no trained weights for {sorted(info['missing_keys'])}: its "
            "classification head would be random. Fine-tune it on this data first with scripts/train_teacher.py "
            "and pass the result as --teacher_model_name_or_path."
        )

    teachers = {teacher_path: teacher}
    for path in other_paths:
        teachers[path] = _load_other_teacher(path, spec, teacher_config, tokenizer, model_args)

    def make_student() -> PreTrainedModel:
        def load_student(path: str) -> PreTrainedModel:
            config = copy.deepcopy(student_config)
            mismatched = config.num_labels != spec.num_labels
            _set_labels(config, spec, student_alignment.id2label)
            if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
                raise ValueError(
                    f"The student's vocabulary ({config.vocab_size}) is smaller than the teacher's tokenizer "
                    f"({len(tokenizer)}); teacher and student must share a tokenizer."
                )
            model, _ = _load_classifier(
                path, config, "student", model_args, ignore_mismatched_sizes=mismatched
            )
            return model

        return build_student(model_args, teacher, load_student)

    return DistillationModels(teacher, tokenizer, student_alignment.label_to_id, make_student, teachers)


def _load_other_teacher(
    path: str,
    spec: TaskSpec,
    first_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_args: ModelArguments,
) -> PreTrainedModel:
    """A further teacher, checked like the first (labels against the data, a trained head) and against the first:
    the same tokenizer (every teacher reads the same input ids) and the same label names."""
    config = load_pretrained(AutoConfig, path, role="teacher", loading_args=model_args)
    alignment = align_labels(spec, config, role=f"teacher {path!r}")
    if not has_named_labels(config):
        _set_labels(config, spec, alignment.id2label)
    config.problem_type = first_config.problem_type
    other_tokenizer = load_tokenizer(path, model_args)
    if other_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher {path!r} has another vocabulary than the first teacher ({len(other_tokenizer)} vs "
            f"{len(tokenizer)} tokens, or the same size with other ids); every teacher reads the same input ids, "
            "so pass teachers fine-tuned from models with one tokenizer."
        )
    model, info = _load_classifier(path, config, "teacher", model_args)
    if info.get("missing_keys"):
        raise ValueError(
            f"The teacher {path!r} has no trained weights for {sorted(info['missing_keys'])}: fine-tune it on this "
            "data first with scripts/train_teacher.py."
        )
    return model


def load_model_for_finetuning(
    model_name_or_path: str, spec: TaskSpec, loading_args: LoadingArguments
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[Any, int]]:
    """A model with a classification head sized for the data (a new head when the sizes differ)."""
    config = load_pretrained(AutoConfig, model_name_or_path, role="model", loading_args=loading_args)
    mismatched = config.num_labels != spec.num_labels
    if not mismatched and has_named_labels(config):
        try:
            alignment = align_labels(spec, config, role="model")
        except ValueError:
            alignment = None  # labels of another task: train a new head in the data's order
    else:
        alignment = None
    if alignment is None:
        natural = align_labels(spec, PretrainedConfig(num_labels=spec.num_labels), role="model")
        _set_labels(config, spec, natural.id2label)
        alignment = natural
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    tokenizer = load_tokenizer(model_name_or_path, loading_args)
    model, _ = _load_classifier(
        model_name_or_path, config, "model", loading_args, ignore_mismatched_sizes=mismatched
    )
    return model, tokenizer, alignment.label_to_id


# --------------------------------------------------------------------------------------------- peers
@dataclass
class Peers:
    """The peers of mutual learning, checked against the data and each other, with their one tokenizer."""

    models: list[PreTrainedModel]
    descriptions: list[str]  # where each peer came from, in peer order
    tokenizer: PreTrainedTokenizerBase
    label_to_id: dict[Any, int]


def _peer_alignment(spec: TaskSpec, configs: Mapping[str, PretrainedConfig]) -> LabelAlignment:
    """The one label order of all peers: that of the peers with named labels, which must agree, else the data's."""
    alignment, reference = None, None
    for path, config in configs.items():
        if not has_named_labels(config):
            continue
        try:
            own = align_labels(spec, config, role=f"peer {path!r}")
        except ValueError as error:
            raise ValueError(f"Peers with different label spaces: {error}") from error
        if alignment is None:
            alignment, reference = own, path
        elif own.label_to_id != alignment.label_to_id:
            raise ValueError(
                f"Peers with different label spaces: peer {path!r} orders its labels {own.id2label} and peer "
                f"{reference!r} {alignment.id2label}; peers compare their outputs class by class, so give them one "
                "label order (fine-tune them with the same label2id)."
            )
    if alignment is None:
        alignment = align_labels(spec, PretrainedConfig(num_labels=spec.num_labels), role="peer")
    return alignment


def load_peers(model_args: ClassificationModelArguments, spec: TaskSpec) -> Peers:
    """The --peer_model_name_or_path peers, then one peer per --peer_num_layers value cut from
    --peer_base_model_name_or_path with create_student.

    A model without a classification head gets a new one for the data's labels (a path given twice loads twice:
    two peers with two new heads). Errors (before training): a classification head for other labels (count, names
    or order), another vocabulary than the first peer's.
    """
    from hf_distill import create_student

    base = model_args.peer_base_model_name_or_path
    sources = list(dict.fromkeys(model_args.peer_model_name_or_path + ([base] if base else [])))
    configs = {
        path: load_pretrained(AutoConfig, path, role=f"peer {path!r}", loading_args=model_args)
        for path in sources
    }
    alignment = _peer_alignment(spec, configs)
    tokenizer = load_tokenizer(sources[0], model_args)
    for path in sources[1:]:
        other = load_tokenizer(path, model_args) if model_args.tokenizer_name is None else tokenizer
        if other.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"peer {path!r} has another vocabulary than peer {sources[0]!r} ({len(other)} vs {len(tokenizer)} "
                "tokens, or other ids); every peer reads the same input ids, so pass peers with one tokenizer."
            )

    def load(path: str) -> PreTrainedModel:
        config = copy.deepcopy(configs[path])
        if not has_named_labels(config):
            _set_labels(config, spec, alignment.id2label)
        config.problem_type = "single_label_classification"
        model, info = _load_classifier(
            path, config, f"peer {path!r}", model_args, ignore_mismatched_sizes=True
        )
        if info.get("mismatched_keys"):
            shapes = sorted(f"{key} {tuple(saved)}" for key, saved, _ in info["mismatched_keys"])
            raise ValueError(
                f"Peers with different label spaces: peer {path!r} has a classification head for another number "
                f"of labels ({', '.join(shapes)}) and the data has {spec.describe_labels()}; pass a peer fine-tuned "
                "on these labels, or a model without a classification head (it gets a new one)."
            )
        if info.get("missing_keys"):
            logger.info(f"peer {path!r}: newly initialised {sorted(info['missing_keys'])} (a new head)")
        if getattr(model.config, "vocab_size", len(tokenizer)) < len(tokenizer):
            raise ValueError(
                f"peer {path!r} has {model.config.vocab_size} embeddings for a tokenizer of {len(tokenizer)} tokens."
            )
        return model

    models = [load(path) for path in model_args.peer_model_name_or_path]
    descriptions = list(model_args.peer_model_name_or_path)
    if base is not None:
        base_model = load(base)
        for layers in model_args.peer_num_layers:
            models.append(create_student(base_model, num_hidden_layers=layers))
            descriptions.append(f"{layers} layers of {base}")
    if len(set(model_args.peer_num_layers)) < len(model_args.peer_num_layers):
        logger.warning(
            f"--peer_num_layers {model_args.peer_num_layers} builds peers that start identical; only dropout tells "
            "them apart. Different layer counts (or peers from different models) give mutual learning more to share."
        )
    if model_args.freeze_embeddings:
        for model in models:
            freeze_input_embeddings(model)
    return Peers(models, descriptions, tokenizer, alignment.label_to_id)
