"""What `quantization.export_onnx` needs around torch's exporter: a logits-only wrapper, the inputs a classifier
takes, dummy batches with padding, and the exported file's metadata trimmed to what quantization reads."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_distill.compression.deployed import _require_onnx
from hf_distill.compression.onnx_int8 import _NAME_SCOPES

_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


class _LogitsOnly(nn.Module):
    """The model with the logits as its only output, whatever the config's output_* flags say."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{name: given[name] for name in self.input_names}, return_dict=True).logits


def _input_names(model: nn.Module, tokenizer) -> list[str]:
    accepted = set(inspect.signature(model.forward).parameters)
    wanted = set(getattr(tokenizer, "model_input_names", None) or _INPUT_ORDER)
    names = [name for name in _INPUT_ORDER if name in accepted and name in wanted]
    if "input_ids" not in names:
        raise ValueError(
            f"export_onnx exports models that take input_ids; {type(model).__name__}.forward takes "
            f"{sorted(accepted)} and the tokenizer gives {sorted(wanted)}."
        )
    return names


def _dummy_inputs(config, input_names: Sequence[str], batch_size: int, length: int, seed: int) -> dict:
    """Random token ids with a padded last row (so masking is exercised) and both token types."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)}
    if "attention_mask" in input_names:
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[-1, max(1, length // 2) :] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in input_names:
        token_types = torch.zeros(batch_size, length, dtype=torch.long)
        if getattr(config, "type_vocab_size", 1) > 1:
            token_types[:, length // 3 :] = 1
        inputs["token_type_ids"] = token_types
    return inputs


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _strip_export_metadata(onnx_path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with local paths, FX nodes: about half of a small
    model's file) but keep the module name scopes, which `quantize_int8` reads to find the modules in keep_float."""
    onnx, _ = _require_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)  # external tensors keep their references
    for node in model.graph.node:
        kept = [(prop.key, prop.value) for prop in node.metadata_props if prop.key == _NAME_SCOPES]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress lines and warns about unused axis names; keep the log readable."""
    import warnings

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
