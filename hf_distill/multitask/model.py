"""The multi-task student: one encoder, one head per task, saved and loaded as one folder.

A head reads the encoder's last hidden states pooled into one vector per text (`mean` over real tokens, or the
first token, `cls`) and maps it with one linear layer to
- `classification`: logits over the task's classes (dropout before the layer, as transformers' classifiers have);
- `embedding`: a sentence embedding of the teacher's width, for a task taught by a sentence encoder.

The folder `save_pretrained` writes holds

    encoder/            an ordinary Hugging Face model folder: `AutoModel.from_pretrained(<folder>/encoder)` loads it
    heads.safetensors   every head's weight and bias, under `<task>.weight` / `<task>.bias`
    multitask.json      the heads (name, kind, width, labels, pooling, init), written last

each written atomically (`hf_distill.storage.atomic`), and `MultiTaskModel.from_pretrained(folder)` loads it back.
`task_model(name)` is a view of one task that is an ordinary sequence classifier (a `config` with the task's
labels, `forward(input_ids, attention_mask, ...) -> logits`), sharing the encoder: what a single-task trainer or
evaluator takes.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput

from hf_distill.storage.atomic import atomic_directory, atomic_write_bytes, atomic_write_text

TASK_KINDS = ("classification", "embedding")
POOLINGS = ("mean", "cls")
HEAD_INITS = ("normal", "identity")
ENCODER_FOLDER = "encoder"
HEADS_FILE = "heads.safetensors"
MULTITASK_FILE = "multitask.json"
_FORMAT = "hf_distill.multitask"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class TaskHead:
    """One task's head: `kind` (classification or embedding), `num_outputs` (classes, or the embedding's width),
    `labels` (class names in output order; default LABEL_0, ...), `pooling` (mean or cls) and `init`: `normal`
    (weights from N(0, initializer_range**2), bias 0) or `identity` (an embedding head as wide as the encoder
    starts as the identity: the student's first embedding is its own pooled output, not a random projection)."""

    name: str
    kind: str
    num_outputs: int
    labels: tuple[str, ...] = field(default=())
    pooling: str = "mean"
    init: str = "normal"

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"task name {self.name!r} must be letters, digits, '_' or '-' (it names the head's weights and "
                "the metrics), starting with a letter or digit."
            )
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"task {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.init not in HEAD_INITS:
            raise ValueError(f"task {self.name!r}: init must be one of {HEAD_INITS}, got {self.init!r}.")
        if self.init == "identity" and self.kind != "embedding":
            raise ValueError(
                f"task {self.name!r}: init='identity' is for embedding heads (a classification head maps the "
                "pooled vector to classes); use init='normal'."
            )
        smallest = 2 if self.kind == "classification" else 1
        if (
            isinstance(self.num_outputs, bool)
            or not isinstance(self.num_outputs, int)
            or self.num_outputs < smallest
        ):
            raise ValueError(
                f"task {self.name!r}: num_outputs must be an integer >= {smallest} (classes, or the embedding's "
                f"width), got {self.num_outputs!r}."
            )
        labels = tuple(str(label) for label in self.labels)
        if self.kind == "embedding" and labels:
            raise ValueError(
                f"task {self.name!r} is an embedding task: it has no labels, got {list(labels)}."
            )
        if self.kind == "classification":
            labels = labels or tuple(f"LABEL_{i}" for i in range(self.num_outputs))
            if len(labels) != self.num_outputs or len(set(labels)) != len(labels):
                raise ValueError(
                    f"task {self.name!r}: give {self.num_outputs} distinct class names, got {list(labels)}."
                )
        object.__setattr__(self, "labels", labels)


@dataclass
class MultiTaskOutput(ModelOutput):
    """`logits`: (batch, classes) for a classification task, (batch, width) embeddings for an embedding task."""

    logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, H) hidden states -> (batch, H): the mean over the real tokens (attention_mask 1)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    return mean_pool(hidden, attention_mask)


class MultiTaskModel(nn.Module):
    """A shared `encoder` (a transformers base model such as `AutoModel.from_pretrained(...)` or a `create_student`
    of one) with one linear head per `TaskHead`. `forward(..., task_id=...)` runs the heads of one task, named by
    its index in `task_names` (a (batch,) tensor of one value, as the multi-task batches carry it) or by `task=`."""

    def __init__(self, encoder: PreTrainedModel, heads: Sequence[TaskHead]):
        super().__init__()
        heads = list(heads)
        if not heads:
            raise ValueError("MultiTaskModel needs at least one TaskHead.")
        names = [head.name for head in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be distinct, got {names}.")
        hidden = getattr(encoder.config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(
                f"the encoder's config ({type(encoder.config).__name__}) has no integer hidden_size: pass a "
                "transformers base model (AutoModel)."
            )
        self.encoder = encoder
        self.task_heads = {head.name: head for head in heads}
        self.task_names = names
        wrong = [head.name for head in heads if head.init == "identity" and head.num_outputs != hidden]
        if wrong:
            raise ValueError(
                f"tasks {wrong} start their heads at the identity, which needs num_outputs equal to the encoder's "
                f"hidden_size ({hidden}); use init='normal' where the widths differ."
            )
        self.heads = nn.ModuleDict({head.name: nn.Linear(hidden, head.num_outputs) for head in heads})
        std = float(getattr(encoder.config, "initializer_range", 0.02) or 0.02)
        for head in heads:
            layer = self.heads[head.name]
            if head.init == "identity":
                nn.init.eye_(layer.weight)
            else:
                nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        dropout = getattr(encoder.config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(float(dropout))

    def task_index(self, task: str) -> int:
        if task not in self.task_heads:
            raise ValueError(f"unknown task {task!r}; the model's tasks are {self.task_names}.")
        return self.task_names.index(task)

    def task_of(self, task_id: Any, task: str | None = None) -> str:
        """The task a batch belongs to: `task` when given, else the one value of `task_id` (a (batch,) tensor or
        an int; raises when a batch mixes tasks), else the only task."""
        if task is not None:
            self.task_index(task)
            return task
        if task_id is None:
            if len(self.task_names) == 1:
                return self.task_names[0]
            raise ValueError(f"say which task to run: task_id= (an index into {self.task_names}) or task=.")
        ids = torch.as_tensor(task_id).reshape(-1)
        if ids.numel() == 0 or bool((ids != ids[0]).any()):
            raise ValueError(f"a batch must hold rows of one task; got task ids {sorted(set(ids.tolist()))}.")
        index = int(ids[0])
        if not 0 <= index < len(self.task_names):
            raise ValueError(f"task_id {index} is out of range for the tasks {self.task_names}.")
        return self.task_names[index]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_id: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
        task: str | None = None,
        **encoder_kwargs: Any,
    ) -> MultiTaskOutput:
        """The task's output (`MultiTaskOutput.logits`); `labels` are accepted and ignored: the trainer computes the
        losses."""
        name = self.task_of(task_id, task)
        head = self.task_heads[name]
        if token_type_ids is not None:
            encoder_kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **encoder_kwargs
        ).last_hidden_state  # (batch, seq, H)
        pooled = pool(hidden, attention_mask, head.pooling)  # (batch, H)
        features = self.dropout(pooled) if head.kind == "classification" else pooled
        return MultiTaskOutput(logits=self.heads[name](features), pooled=pooled)

    def task_model(self, task: str) -> TaskModel:
        """A view of `task` as a one-task model sharing this model's weights (see `TaskModel`)."""
        self.task_index(task)
        return TaskModel(self, task)

    # ---- one folder, loaded back ------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """Write `encoder/`, `heads.safetensors` and `multitask.json` into `folder` (module docstring)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_directory(folder / ENCODER_FOLDER, overwrite=True) as building:
            self.encoder.save_pretrained(building)
        tensors = {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, layer in self.heads.items()
            for key, value in layer.state_dict().items()
        }
        atomic_write_bytes(folder / HEADS_FILE, save(tensors))
        description = {
            "format": _FORMAT,
            "version": 1,
            "encoder": ENCODER_FOLDER,
            "tasks": [
                {**asdict(self.task_heads[name]), "labels": list(self.task_heads[name].labels)}
                for name in self.task_names
            ],
        }
        atomic_write_text(folder / MULTITASK_FILE, json.dumps(description, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, **encoder_kwargs: Any) -> MultiTaskModel:
        """The model `save_pretrained` wrote into `folder` (extra arguments go to the encoder's `from_pretrained`)."""
        folder = Path(folder)
        heads = read_heads(folder)
        encoder = AutoModel.from_pretrained(folder / ENCODER_FOLDER, **encoder_kwargs)
        model = cls(encoder, heads)
        model.load_heads(folder)
        return model

    def load_heads(self, folder: str | Path) -> None:
        """Load the heads' weights from `folder`/heads.safetensors; every head must be there with its shape."""
        from safetensors.torch import load_file

        path = Path(folder) / HEADS_FILE
        if not path.is_file():
            raise ValueError(
                f"{folder} has no {HEADS_FILE}: it was not written by MultiTaskModel.save_pretrained."
            )
        tensors = load_file(str(path))
        for name, layer in self.heads.items():
            state = {key: tensors.get(f"{name}.{key}") for key in layer.state_dict()}
            missing = [f"{name}.{key}" for key, value in state.items() if value is None]
            if missing:
                raise ValueError(f"{path} lacks {missing}: it holds {sorted(tensors)}.")
            layer.load_state_dict(state)

    def load_weights(self, folder: str | Path) -> None:
        """Load the encoder's and the heads' weights saved in `folder` into this model (a checkpoint, on resume)."""
        heads = read_heads(folder)
        if [head.name for head in heads] != self.task_names:
            raise ValueError(
                f"{folder} holds the tasks {[h.name for h in heads]}, this model {self.task_names}."
            )
        saved = type(self.encoder).from_pretrained(Path(folder) / ENCODER_FOLDER)
        self.encoder.load_state_dict(saved.state_dict())
        self.load_heads(folder)


def read_heads(folder: str | Path) -> list[TaskHead]:
    """The heads described in `folder`/multitask.json."""
    path = Path(folder) / MULTITASK_FILE
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{folder} is not a multi-task model folder ({MULTITASK_FILE} unreadable: {error}); write one with "
            "MultiTaskModel.save_pretrained."
        ) from error
    if description.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} description (format {description.get('format')!r}).")
    return [TaskHead(**{**task, "labels": tuple(task.get("labels", ()))}) for task in description["tasks"]]


class TaskModel(nn.Module):
    """One task of a `MultiTaskModel`, as a one-task model: `config` is the encoder's with the task's labels
    (`num_labels`, `id2label`, `label2id`, problem_type single_label_classification), and `forward` returns a
    `SequenceClassifierOutput` whose `logits` are the task's (its embeddings, for an embedding task)."""

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task
        head = model.task_heads[task]
        self.config = copy.deepcopy(model.encoder.config)
        if head.kind == "classification":
            self.config.num_labels = head.num_outputs
            self.config.id2label = dict(enumerate(head.labels))
            self.config.label2id = {label: i for i, label in enumerate(head.labels)}
            self.config.problem_type = "single_label_classification"

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        kwargs.pop("task_id", None)
        outputs = self.model(input_ids, attention_mask, token_type_ids, task=self.task, **kwargs)
        return SequenceClassifierOutput(logits=outputs.logits)
