"""create_student: a shallower copy of a teacher, initialised from a subset of its layers (DistilBERT-style).

The student has the teacher's class and config except for the number of layers. Everything that is not a
transformer layer (embeddings, final norms, pooler, heads, LM head, classifier) is copied from the teacher,
and student layer ``j`` is copied from teacher layer ``layers[j]`` (Sanh et al., 2019, "DistilBERT").

The approach is generic: build an empty student from the modified config, find the layer ``nn.ModuleList``
of each stack (encoder / decoder) by its length, and copy the teacher's state dict into the student under
renamed keys (``<stack>.{layers[j]}.*`` -> ``<stack>.{j}.*``). Every student tensor must be filled, so an
architecture this does not understand fails loudly instead of training from a half-random student.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["create_student", "uniform_layer_indices"]

TESTED_FAMILIES = (
    "BERT",
    "RoBERTa",
    "DistilBERT",
    "GPT-2",
    "Llama",
    "Qwen2",
    "Mistral",
    "BART",
    "Marian",
    "T5",
)

# Config attributes that hold one entry per layer of the main (encoder or decoder-only) stack.
_PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
# Where encoder-decoder configs keep the decoder depth (T5: num_decoder_layers; BART, Marian: decoder_layers).
_DECODER_DEPTH_ATTRIBUTES = ("num_decoder_layers", "decoder_layers")


@dataclass
class _LayerStack:
    """One stack of layers to shrink: its path in the model and which teacher layers the student keeps."""

    label: str  # "layers", or "encoder" / "decoder" for encoder-decoder models
    path: str  # e.g. "model.layers", "encoder.block"
    indices: list[int]  # student layer j <- teacher layer indices[j]


def uniform_layer_indices(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """`num_student_layers` teacher layer indices spread evenly over `range(num_teacher_layers)`.

    Rule: index j is ``round(j * (L - 1) / (k - 1))`` with halves rounded up, so the first (0) and the last
    (L - 1) teacher layers are always kept and the result is strictly increasing. With k = 1 the last layer
    is kept (``[L - 1]``): its output is what the teacher's final norm and head were trained on.
    Examples: L=12, k=6 -> [0, 2, 4, 7, 9, 11]; L=6, k=3 -> [0, 3, 5]; L=k -> all layers.
    """
    last, k = num_teacher_layers - 1, num_student_layers
    if k == 1:
        return [last]
    # Integer arithmetic for round-half-up of j * last / (k - 1): no float ties, fully deterministic.
    return [(2 * j * last + (k - 1)) // (2 * (k - 1)) for j in range(k)]


def _resolve_indices(
    label: str,
    teacher_count: int,
    count: int | None,
    layers: str | Sequence[int],
    count_arg: str,
    layers_arg: str,
) -> list[int]:
    """Turn the user's (count, layers) pair into validated teacher indices for one stack."""
    valid = f"[0, {teacher_count - 1}]"
    if isinstance(layers, str):
        if layers != "uniform":
            raise ValueError(
                f"{layers_arg}={layers!r} is not supported; pass 'uniform' or a list of teacher {label} "
                f"indices in {valid}."
            )
        if count is None:  # nothing asked for this stack: keep it whole
            return list(range(teacher_count))
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= teacher_count:
            raise ValueError(
                f"{count_arg}={count!r} is invalid: the teacher has {teacher_count} {label} layers, so it "
                f"must be an integer from 1 to {teacher_count}; pass a smaller value or another teacher."
            )
        return uniform_layer_indices(teacher_count, count)

    indices = list(layers)
    if not indices:
        raise ValueError(f"{layers_arg} is empty; pass at least one teacher {label} index in {valid}.")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < teacher_count:
            raise ValueError(
                f"{layers_arg} contains {index!r}, but the teacher has {teacher_count} {label} layers: "
                f"indices must be integers in {valid}; drop or fix that index."
            )
    duplicates = sorted({index for index in indices if indices.count(index) > 1})
    if duplicates:
        raise ValueError(
            f"{layers_arg}={indices} repeats {duplicates}; each teacher {label} layer can initialise at "
            "most one student layer, so pass unique indices."
        )
    if count is not None and count != len(indices):
        raise ValueError(
            f"{count_arg}={count} but {layers_arg} lists {len(indices)} layers {indices}; pass "
            f"{count_arg}={len(indices)} or leave it as None."
        )
    if indices != sorted(indices):
        logger.warning(
            f"{layers_arg}={indices} is not increasing: the student's {label} layers are reordered."
        )
    return indices


def _check_not_peft(teacher: nn.Module) -> None:
    """Adapters would be silently dropped (or copied unmerged), so refuse them up front."""
    for name, module in teacher.named_modules():
        if type(module).__module__.startswith("peft."):
            where = (
                f"module {name!r} is a {type(module).__name__}"
                if name
                else f"it is a {type(module).__name__}"
            )
            raise ValueError(
                f"The teacher carries PEFT adapters ({where}), which create_student cannot copy. Merge them "
                "first: `teacher = teacher.merge_and_unload()`, then call create_student on the merged model."
            )


def _unsupported(teacher: nn.Module, reason: str) -> ValueError:
    return ValueError(
        f"create_student does not support {type(teacher).__name__}: {reason}. It needs a Hugging Face model "
        f"whose layers sit in one nn.ModuleList per stack; tested families: {', '.join(TESTED_FAMILIES)}."
    )


def _find_layer_list(teacher: PreTrainedModel, root: nn.Module, count: int, label: str) -> str:
    """Path of the nn.ModuleList of `count` layers inside `root` (outermost one, e.g. not T5's sub-layers)."""
    inside_root = {id(module) for module in root.modules()}
    candidates = [
        name
        for name, module in teacher.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and id(module) in inside_root
    ]
    outermost = [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]
    if len(outermost) != 1:
        found = f"found {outermost}" if outermost else "found none"
        raise _unsupported(teacher, f"expected one nn.ModuleList of {count} {label} layers, {found}")
    return outermost[0]


def _decoder_depth_attribute(teacher: PreTrainedModel) -> str:
    for attribute in _DECODER_DEPTH_ATTRIBUTES:
        if isinstance(getattr(teacher.config, attribute, None), int):
            return attribute
    raise _unsupported(teacher, f"its config has none of {_DECODER_DEPTH_ATTRIBUTES} for the decoder depth")


def _teacher_key(student_key: str, stacks: list[_LayerStack], teacher_state: dict[str, torch.Tensor]) -> str:
    """The teacher state-dict key that initialises `student_key`."""
    for stack in stacks:
        if student_key.startswith(stack.path + "."):
            position, _, rest = student_key[len(stack.path) + 1 :].partition(".")
            key = f"{stack.path}.{stack.indices[int(position)]}.{rest}"
            # Some parameters exist only in a stack's first layer (T5's relative attention bias): the
            # student's layer 0 has them even when its teacher layer does not, so take the teacher's layer 0.
            first_layer_key = f"{stack.path}.0.{rest}"
            if key not in teacher_state and first_layer_key in teacher_state:
                return first_layer_key
            return key
    return student_key


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.dtype != source.dtype:  # e.g. T5's `wo` kept in float32 inside a float16 teacher
        target.data = target.data.to(source.dtype)
    target.copy_(source)


@torch.no_grad()
def _copy_teacher_tensors(
    teacher: PreTrainedModel, student: PreTrainedModel, stacks: list[_LayerStack]
) -> None:
    """Fill every student parameter and buffer from the teacher; fail if one has no teacher counterpart."""
    teacher_tensors = {**dict(teacher.named_buffers()), **teacher.state_dict()}
    # keep_vars: the Parameters themselves, so a dtype change keeps tied modules sharing one Parameter.
    student_state = student.state_dict(keep_vars=True)
    for student_key, target in student_state.items():
        teacher_key = _teacher_key(student_key, stacks, teacher_tensors)
        source = teacher_tensors.get(teacher_key)
        if source is None or source.shape != target.shape:
            found = "missing" if source is None else f"of shape {tuple(source.shape)}"
            raise _unsupported(
                teacher,
                f"student tensor {student_key} {tuple(target.shape)} should come from teacher tensor "
                f"{teacher_key}, which is {found}",
            )
        _copy_into(target, source)
    # Buffers outside the state dict (rotary inv_freq, position ids) are derived from the config, so the
    # student's own are valid; the teacher's are copied anyway because a cast teacher (`.to(bfloat16)`)
    # carries them in its dtype, and the student should compute exactly as the teacher does.
    for student_key, target in student.named_buffers():
        if student_key not in student_state:
            source = teacher_tensors.get(_teacher_key(student_key, stacks, teacher_tensors))
            if source is not None and source.shape == target.shape:
                _copy_into(target, source)


def create_student(
    teacher: PreTrainedModel,
    num_hidden_layers: int | None = None,
    layers: str | Sequence[int] = "uniform",
    *,
    num_decoder_layers: int | None = None,
    decoder_layers: str | Sequence[int] = "uniform",
) -> PreTrainedModel:
    """A model of the teacher's class with fewer layers, initialised from the teacher (DistilBERT-style).

    Args:
        teacher: a Hugging Face model (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Qwen2, Mistral, BART,
            Marian, T5 and architectures built the same way). PEFT adapters must be merged first
            (`teacher.merge_and_unload()`); a teacher with adapters raises ValueError.
        num_hidden_layers: student depth k (the encoder's for encoder-decoder models).
        layers: "uniform" (see `uniform_layer_indices`: evenly spread, first and last kept) or an explicit
            list of unique teacher indices in [0, L); student layer j is initialised from teacher layer
            layers[j]. With a list, num_hidden_layers may be None (it becomes len(layers)).
        num_decoder_layers, decoder_layers: the same for the decoder of encoder-decoder models.

    When neither a count nor a list is given for a stack, that stack keeps all of the teacher's layers:
    `create_student(t5, num_hidden_layers=12)` shrinks only the encoder. Pass `num_decoder_layers` to
    shrink the decoder too (a shallow decoder is what speeds up generation).

    Everything outside the layers (embeddings, final norms, pooler, heads, label maps) is copied; tied
    weights stay tied; per-layer config lists (`layer_types`, ...) are sliced with the chosen indices and
    Qwen2's `max_window_layers` is recomputed. The student lives on `teacher.device`, each tensor in the
    dtype of the teacher tensor it was copied from, in the teacher's train/eval mode and with a copy of its
    generation config. The chosen indices are logged and kept as `student.distilled_from_layers`
    ({"layers": [...]} plus "decoder_layers" for encoder-decoder models); the config is not annotated, so
    it stays loadable by stock transformers.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a transformers PreTrainedModel, got {type(teacher).__name__}.")
    _check_not_peft(teacher)
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(f"teacher must be a transformers PreTrainedModel, got {type(teacher).__name__}.")
    config = teacher.config
    teacher_depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(teacher_depth, int):
        raise _unsupported(teacher, f"its config ({type(config).__name__}) has no integer num_hidden_layers")

    student_config = copy.deepcopy(config)
    main_label = "encoder" if config.is_encoder_decoder else "layers"
    main_indices = _resolve_indices(
        main_label, teacher_depth, num_hidden_layers, layers, "num_hidden_layers", "layers"
    )
    main_root = teacher.get_encoder() if config.is_encoder_decoder else teacher
    if main_root is teacher and config.is_encoder_decoder:
        raise _unsupported(teacher, "get_encoder() does not return a separate encoder module")
    stacks = [
        _LayerStack(main_label, _find_layer_list(teacher, main_root, teacher_depth, main_label), main_indices)
    ]
    student_config.num_hidden_layers = len(main_indices)  # attribute_map: n_layer, n_layers, num_layers, ...
    for attribute in _PER_LAYER_CONFIG_LISTS:
        per_layer = getattr(config, attribute, None)
        if isinstance(per_layer, (list, tuple)) and len(per_layer) == teacher_depth:
            setattr(student_config, attribute, [per_layer[i] for i in main_indices])
    # Qwen2-style: layers with index >= max_window_layers use sliding-window attention.
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int):
        student_config.max_window_layers = sum(i < max_window_layers for i in main_indices)

    if config.is_encoder_decoder:
        depth_attribute = _decoder_depth_attribute(teacher)
        decoder_depth = getattr(config, depth_attribute)
        decoder_indices = _resolve_indices(
            "decoder",
            decoder_depth,
            num_decoder_layers,
            decoder_layers,
            "num_decoder_layers",
            "decoder_layers",
        )
        decoder_root = teacher.get_decoder()
        if decoder_root is teacher:
            raise _unsupported(teacher, "get_decoder() does not return a separate decoder module")
        stacks.append(
            _LayerStack(
                "decoder", _find_layer_list(teacher, decoder_root, decoder_depth, "decoder"), decoder_indices
            )
        )
        setattr(student_config, depth_attribute, len(decoder_indices))
    elif num_decoder_layers is not None or not (
        isinstance(decoder_layers, str) and decoder_layers == "uniform"
    ):
        raise ValueError(
            f"num_decoder_layers/decoder_layers apply only to encoder-decoder models, but "
            f"{type(teacher).__name__} is not one; choose its layers with num_hidden_layers/layers."
        )

    # Built directly on the teacher's device and in its dtype; the random init is overwritten below.
    with torch.device(teacher.device):
        student = type(teacher)._from_config(student_config, dtype=teacher.dtype)

    _copy_teacher_tensors(teacher, student, stacks)

    if teacher.can_generate() and getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    student.distilled_from_layers = {"layers": stacks[0].indices}
    if len(stacks) > 1:
        student.distilled_from_layers["decoder_layers"] = stacks[1].indices
    for stack in stacks:
        logger.info(
            f"create_student: {type(teacher).__name__} {stack.label} {stack.path}: student layers "
            f"0..{len(stack.indices) - 1} <- teacher layers {stack.indices}"
        )
    return student
