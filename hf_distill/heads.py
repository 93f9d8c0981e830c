"""Classification heads that grow: a trained sequence classifier given new classes after its old ones.

`grow_classifier` copies the model and widens its output layer: the old classes keep their rows (weights and bias)
and their positions, the new classes get new rows after them, initialised small and random (normal with the config's
`initializer_range`, zero bias). Before any training the grown model therefore gives exactly the old model's logits
on the old classes. The result is an ordinary Hugging Face model (edited config, a wider `nn.Linear`), saved and
loaded with the standard loaders.

The label checks say why a class cannot be added: a new class that reuses an old class's name, a previous model
whose labels have no names (`LABEL_0`, ...) and so cannot be matched with the data's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["check_new_labels", "classifier_layer", "grow_classifier", "label_names"]


def label_names(config: PretrainedConfig, role: str = "previous model") -> list[str]:
    """The class names of a classifier's config, in output order; raises when it has only transformers' default
    names (`LABEL_0`, `LABEL_1`, ...), which cannot be matched with the data's labels."""
    id2label = getattr(config, "id2label", None) or {}
    count = getattr(config, "num_labels", len(id2label))
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        raise ValueError(
            f"the {role}'s {count} labels have no names ({names}), so its classes cannot be matched by name with "
            "the data's labels; save it with id2label/label2id naming its classes (scripts/train_teacher.py does "
            "this for string labels), or set them in its config.json."
        )
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"the {role} names several classes {duplicated}; every class needs its own name.")
    return names


def check_new_labels(old_labels: Sequence[str], new_labels: Sequence[str]) -> list[str]:
    """`new_labels` as a list after checking it: at least one, no repeats, and none reusing an old class's name
    (compared case-insensitively: 'Sport' and 'sport' would be one topic in two rows)."""
    new_labels = [str(label) for label in new_labels]
    if not new_labels:
        raise ValueError(
            f"no new classes to add to the previous model's {list(old_labels)}: give the classes to add (the "
            "training data's labels that the previous model lacks)."
        )
    repeated = sorted({label for label in new_labels if new_labels.count(label) > 1})
    if repeated:
        raise ValueError(f"new classes {new_labels} repeat {repeated}; list each new class once.")
    old_by_key = {label.lower(): label for label in old_labels}
    reused = [
        f"{label!r} (old class {old_by_key[label.lower()]!r})"
        for label in new_labels
        if label.lower() in old_by_key
    ]
    if reused:
        raise ValueError(
            f"new classes reuse old class names: {', '.join(reused)}. The previous model already predicts them, so "
            "they are not new: drop them from the new classes (rows of old classes may stay in the training data), "
            "or rename the new class."
        )
    return new_labels


def classifier_layer(model: nn.Module, head_name: str | None = None) -> tuple[str, nn.Linear]:
    """(name, layer) of a sequence classifier's output layer: `head_name` if given, else the one `nn.Linear` whose
    `out_features` is `config.num_labels` (BERT's `classifier`, RoBERTa's `classifier.out_proj`, Llama's `score`)."""
    modules = dict(model.named_modules())
    if head_name is not None:
        layer = modules.get(head_name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head_name={head_name!r} is not an nn.Linear of {type(model).__name__}.")
        return head_name, layer
    count = getattr(getattr(model, "config", None), "num_labels", None)
    candidates = [
        (name, module)
        for name, module in modules.items()
        if isinstance(module, nn.Linear) and module.out_features == count
    ]
    if len(candidates) != 1:
        found = [name for name, _ in candidates] or "none"
        raise ValueError(
            f"cannot tell which layer of {type(model).__name__} is its classification head: expected one nn.Linear "
            f"with {count} (config.num_labels) outputs, found {found}; pass head_name= naming it."
        )
    return candidates[0]


@torch.no_grad()
def grow_classifier(
    model: nn.Module,
    new_labels: Sequence[str],
    *,
    seed: int | None = None,
    head_name: str | None = None,
) -> nn.Module:
    """A copy of the sequence classifier `model` that also predicts `new_labels`, placed after its old classes.

    Old rows (weight and bias) are copied unchanged; new rows are drawn from N(0, initializer_range**2) (0.02 when
    the config has none) with `seed` (None: the global generator), biases 0. The config's `num_labels`, `id2label`
    and `label2id` are extended; `model` itself is not changed. Which parameters train is copied too (frozen word
    embeddings stay frozen): grow a model before it is frozen as a teacher, or unfreeze the copy. Raises when the
    model's labels have no names or a new class reuses an old name (`check_new_labels`).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"grow_classifier needs a transformers model with a config, got {type(model).__name__}."
        )
    old_labels = label_names(config)
    new_labels = check_new_labels(old_labels, new_labels)
    name, layer = classifier_layer(model, head_name)
    grown = copy.deepcopy(model)
    old_count, total = layer.out_features, layer.out_features + len(new_labels)
    wider = nn.Linear(
        layer.in_features,
        total,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    new_rows = torch.randn((len(new_labels), layer.in_features), generator=generator) * std
    wider.weight.copy_(torch.cat([layer.weight.detach().cpu().float(), new_rows]).to(wider.weight))
    if layer.bias is not None:
        wider.bias.copy_(
            torch.cat([layer.bias.detach().cpu().float(), torch.zeros(len(new_labels))]).to(wider.bias)
        )
    wider.requires_grad_(layer.weight.requires_grad)
    parent_name, _, attribute = name.rpartition(".")
    parent = grown.get_submodule(parent_name) if parent_name else grown
    setattr(parent, attribute, wider)

    labels = [*old_labels, *new_labels]
    grown.config.num_labels = total
    grown.config.id2label = dict(enumerate(labels))
    grown.config.label2id = {label: index for index, label in enumerate(labels)}
    logger.info(
        f"grow_classifier: {name} {old_count} -> {total} classes; kept {old_labels}, added {list(new_labels)}"
    )
    return grown


@torch.no_grad()
def align_new_class_weights(
    model: nn.Module,
    old_columns: Sequence[int] | torch.Tensor,
    *,
    head_name: str | None = None,
    scale_bias: bool = True,
) -> float:
    """Weight aligning (Zhao et al., 2020), in place: scale the classification head's rows of the new classes so
    that their mean L2 norm equals the old classes' rows' mean norm, and return the factor
    `mean ||w_old|| / mean ||w_new||`.

    A classifier that learnt new classes from their rows alone (plus at most a small memory of old ones) has grown
    longer weight vectors for them, and its argmax over all classes leans towards the new ones; the rescaling
    removes that bias without touching the features. `old_columns` are the head's rows of the old classes; every
    other row is new. With `scale_bias` the new rows' biases are scaled by the same factor, so that every new
    class's logit is multiplied by it (without, only the weight part is). Raises when no row is old or none is new.
    """
    _, layer = classifier_layer(model, head_name)
    rows = layer.out_features
    old = torch.as_tensor(old_columns, dtype=torch.long).flatten().tolist()
    if not old or len(set(old)) != len(old) or min(old) < 0 or max(old) >= rows:
        raise ValueError(
            f"old_columns {old} must name distinct rows among the head's {rows} classes, at least one."
        )
    kept = set(old)
    new = [row for row in range(rows) if row not in kept]
    if not new:
        raise ValueError(f"every one of the head's {rows} rows is old: there is no new class to align.")
    norms = layer.weight.detach().float().norm(dim=1)
    new_norm = float(norms[new].mean())
    if new_norm == 0.0:
        raise ValueError("the new classes' weight rows are all zero: train them before aligning.")
    factor = float(norms[old].mean()) / new_norm
    index = torch.tensor(new, device=layer.weight.device)
    layer.weight[index] *= factor
    if scale_bias and layer.bias is not None:
        layer.bias[index] *= factor
    logger.info(f"align_new_class_weights: new classes' rows {new} scaled by {factor:.4f}")
    return factor
