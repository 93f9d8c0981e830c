"""Generation models deployed and run: a causal LM or a translator exported to CTranslate2 (INT8 weights, a KV
cache, no torch at serving time), and the same interface over the PyTorch model as the reference.

Why CTranslate2: it was measured against PyTorch float32 on this project's CPUs (`benchmarks/bench_generation_runtime.py`,
docs/BENCHMARKS.md): the fastest greedy decoding at batch 1 and 8, a quarter of the size on disk in INT8, a
light wheel that needs neither torch nor a compiler, and one converter for both Llama-family decoders and
Marian/BART translators. `ctranslate2` is the `generation` extra: `pip install "hf-distill[generation]"`.

- `export_ctranslate2(model_dir, folder, quantization="int8")`: an ordinary Hugging Face folder -> a CTranslate2
  folder (`model.bin`, its `config.json` and vocabulary) with the tokenizer files beside it and `deployment.json`
  saying what it is. The folder loads with `ctranslate2.Generator` / `ctranslate2.Translator` and
  `tokenizers.Tokenizer.from_file("tokenizer.json")` alone.
- `load_generation_model(folder)`: a `CTranslate2CausalLM`, `CTranslate2Translator`, or the PyTorch references
  `torch_generation.TorchCausalLM` / `TorchTranslator`, all with the same calls: `generate(prompts,
  max_new_tokens)` (greedy, exactly that many new tokens: the end token does not stop a row, so that timings compare
  equal work), `translate(sources, ...)` for translators, and `log_likelihood(blocks)` for causal LMs (summed
  next-token log-probabilities and their count, which gives the deployed model's own perplexity).
- `deployed_size(folder)`: bytes of the weights on disk, whatever the runtime.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from hf_distill.compression.torch_generation import PYTORCH, TorchCausalLM, TorchTranslator
from hf_distill.storage.atomic import atomic_directory, atomic_write_text
from hf_distill.storage.sizes import size_on_disk

logger = logging.get_logger(__name__)

__all__ = [
    "CTRANSLATE2",
    "DEPLOYMENT_FILE",
    "PYTORCH",
    "CTranslate2CausalLM",
    "CTranslate2Translator",
    "deployed_size",
    "export_ctranslate2",
    "load_generation_model",
    "require_ctranslate2",
]

CTRANSLATE2 = "ctranslate2"
DEPLOYMENT_FILE = "deployment.json"
CT2_WEIGHTS = "model.bin"
QUANTIZATIONS = ("int8", "int8_float32", "float32", "int16")
# What a deployed folder keeps of the Hugging Face folder: the tokenizer (CTranslate2 writes its own config.json).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
EXTRA = "generation"


def require_ctranslate2() -> Any:
    """The ctranslate2 module, or an ImportError naming the extra that installs it."""
    if importlib.util.find_spec("ctranslate2") is None:
        raise ImportError(
            f'CTranslate2 is not installed; run `pip install "hf-distill[{EXTRA}]"` (or `pip install ctranslate2`).'
        )
    import ctranslate2

    return ctranslate2


# --------------------------------------------------------------------------------------------- export
def _needs_mistral_view(config: Any) -> bool:
    """CTranslate2's Llama converter derives the head size as hidden_size / num_attention_heads; a Llama whose
    explicit head_dim differs (pruned heads, hidden kept) converts through its Mistral loader, which reads head_dim."""
    head_dim = getattr(config, "head_dim", None)
    return (
        config.model_type == "llama"
        and head_dim is not None
        and head_dim * config.num_attention_heads != (config.hidden_size)
    )


def _mistral_view(model_dir: Path, view: Path) -> Path:
    """The same weights under a MistralConfig without a sliding window (the same computation as Llama's when the
    Llama has no attention or MLP bias and default RoPE)."""
    from transformers import AutoConfig, MistralConfig

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(
            f"{model_dir}: a Llama with attention or MLP biases and a head size other than hidden_size / heads "
            "cannot be converted to CTranslate2; keep hidden_size = heads x head_dim when pruning it."
        )
    values = {
        key: getattr(config, key)
        for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        )
    }  # fmt: skip
    rope = getattr(config, "rope_parameters", None)
    if rope:
        values["rope_parameters"] = rope
    view.mkdir(parents=True, exist_ok=True)
    MistralConfig(**values, sliding_window=None).save_pretrained(view)
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, view / item.name)
    return view


@contextlib.contextmanager
def _translator_loaders(ctranslate2: Any) -> Iterator[None]:
    """CTranslate2's converter, corrected for two translators, for the duration of a conversion.

    BART: its loader reads `config.normalize_before`, which transformers 5 no longer writes; BART is post-norm, so
    it is given False when missing.

    Marian: CTranslate2's Marian converter assumes the Hub's OPUS-MT layout: `<pad>` is the last token (transformers
    appends it), its embedding row is zero, and the decoder starts from it. So it drops the last row and the last
    vocabulary entry, and starts the decoder from a zero embedding (`start_from_zero_embedding`, whatever
    `decoder_start_token` says). A Marian trained here breaks both: its `<pad>` can be any id (a tokenizer trained
    with `<pad>` first) and its tied embeddings give the start token's row a gradient through the LM head, so the
    row is not zero and a zero start decodes something else (on the translation demo: 31.44 BLEU against 37.87).
    For the conversion, the loader keeps the Hub behaviour only where its assumptions hold; otherwise it keeps every
    row and token and starts the decoder from the model's own `decoder_start_token_id`, as `generate` does."""
    module = ctranslate2.converters.transformers
    loaders = module._MODEL_LOADERS
    originals = {name: loaders[name] for name in ("MarianConfig", "BartConfig") if name in loaders}

    class _BartLoader(module.BartLoader):
        def get_model_spec(self, model: Any) -> Any:
            if not hasattr(model.config, "normalize_before"):
                model.config.normalize_before = False
            return super().get_model_spec(model)

    class _MarianLoader(module.MarianMTLoader):
        def get_model_spec(self, model: Any) -> Any:
            config = model.config
            start = config.decoder_start_token_id
            start_row = model.get_decoder().embed_tokens.weight[start]
            self.hub_layout = (
                config.pad_token_id == config.vocab_size - 1
                and start == config.pad_token_id
                and not bool(start_row.any())
            )
            return super().get_model_spec(model)

        def set_decoder(self, spec: Any, decoder: Any) -> None:
            super().set_decoder(spec, decoder)
            spec.start_from_zero_embedding = self.hub_layout

        def set_config(self, config: Any, model: Any, tokenizer: Any) -> None:
            super().set_config(config, model, tokenizer)
            if not self.hub_layout:
                config.decoder_start_token = tokenizer.convert_ids_to_tokens(
                    model.config.decoder_start_token_id
                )

        def get_vocabulary(self, model: Any, tokenizer: Any) -> list[str]:
            if self.hub_layout:
                return super().get_vocabulary(model, tokenizer)
            return module.BartLoader.get_vocabulary(self, model, tokenizer)  # every token, `<pad>` included

        def _remove_pad_weights(self, spec: Any) -> None:
            if self.hub_layout:
                super()._remove_pad_weights(spec)

    if "MarianConfig" in originals:
        loaders["MarianConfig"] = _MarianLoader()
    if "BartConfig" in originals:
        loaders["BartConfig"] = _BartLoader()
    try:
        yield
    finally:
        loaders.update(originals)


def export_ctranslate2(
    model_dir: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    quantization: str = "int8",
    overwrite: bool = True,
    work_dir: str | os.PathLike | None = None,
) -> Path:
    """Convert the Hugging Face model in `model_dir` (a Llama/Mistral/Qwen/GPT-2 causal LM or a Marian/BART/T5
    translator, with its tokenizer) into a CTranslate2 folder, written atomically.

    quantization: weights on disk and in memory: "int8" (per-row scales, activations quantized on the fly),
    "int8_float32", "int16" or "float32". Returns the folder."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}; use one of {list(QUANTIZATIONS)}.")
    ctranslate2 = require_ctranslate2()
    from transformers import AutoConfig

    model_dir, folder = Path(model_dir), Path(folder)
    config = AutoConfig.from_pretrained(model_dir)
    source = model_dir
    scratch = Path(work_dir) if work_dir is not None else folder.parent / f".{folder.name}.work"
    if _needs_mistral_view(config):
        source = _mistral_view(model_dir, scratch / "mistral_view")
    with atomic_directory(folder, overwrite=overwrite) as building:
        converter = ctranslate2.converters.TransformersConverter(str(source))
        # convert() insists on creating its folder itself: convert into a child, then move the files up.
        converted = building / "ct2"
        with _translator_loaders(ctranslate2):
            converter.convert(str(converted), quantization=quantization, force=True)
        for item in converted.iterdir():
            shutil.move(str(item), building / item.name)
        converted.rmdir()
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, building / name)
        params = _parameter_count(model_dir)
        atomic_write_text(
            building / DEPLOYMENT_FILE,
            json.dumps(
                {
                    "runtime": CTRANSLATE2,
                    "ctranslate2": ctranslate2.__version__,
                    "quantization": quantization,
                    "task": "translation" if config.is_encoder_decoder else "causal_lm",
                    "model_type": config.model_type,
                    "params": params,
                    "vocab_size": config.vocab_size,
                },
                indent=2,
            ),
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _parameter_count(model_dir: Path) -> int:
    """Parameters of a saved model, read from its safetensors headers (tied tensors stored once count once)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"No .safetensors weights in {model_dir}; save the model with save_pretrained first."
        )
    count = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                count += int(torch.Size(handle.get_slice(key).get_shape()).numel())
    return count


def deployed_size(folder: str | os.PathLike) -> int:
    """Bytes of a deployed folder's weights on disk: CTranslate2's model.bin, else the Hugging Face / ONNX weights."""
    folder = Path(folder)
    if (folder / CT2_WEIGHTS).is_file():
        return (folder / CT2_WEIGHTS).stat().st_size
    return size_on_disk(folder)


def deployment_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / DEPLOYMENT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --------------------------------------------------------------------------------------------- running
class _Vocabulary:
    """Ids <-> the token strings CTranslate2 takes, read from the folder's own vocabulary file."""

    def __init__(self, folder: Path, name: str = "vocabulary"):
        json_path, text_path = folder / f"{name}.json", folder / f"{name}.txt"
        if json_path.is_file():
            self.tokens = json.loads(json_path.read_text(encoding="utf-8"))
        elif text_path.is_file():
            self.tokens = text_path.read_text(encoding="utf-8").split("\n")
        else:
            raise ValueError(f"{folder} has no {name}.json or {name}.txt: not a CTranslate2 folder.")

    def to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


class CTranslate2CausalLM:
    """A CTranslate2 causal-LM folder run by `ctranslate2.Generator` on CPU with `num_threads` threads."""

    runtime = CTRANSLATE2

    def __init__(
        self, folder: str | os.PathLike, *, num_threads: int | None = None, compute_type: str = "default"
    ):
        ctranslate2 = require_ctranslate2()
        self.path = Path(folder)
        self.generator = ctranslate2.Generator(
            str(self.path),
            device="cpu",
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=num_threads or 0,
        )
        self.vocabulary = _Vocabulary(self.path)
        self.info = deployment_info(self.path) or {}

    @property
    def params(self) -> int | None:
        return self.info.get("params")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (ids), exactly `max_new_tokens` new ids per row: the end token is
        turned off (decoded like any other token), as in the PyTorch reference."""
        results = self.generator.generate_batch(
            [self.vocabulary.to_tokens(prompt) for prompt in prompts],
            max_length=max_new_tokens,
            end_token=[],
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
        )
        return [list(result.sequences_ids[0][:max_new_tokens]) for result in results]

    def log_likelihood(self, blocks: Sequence[Sequence[int]]) -> tuple[float, int]:
        """(sum of log p(token | the tokens before it) over every token but the first of each block, count)."""
        results = self.generator.score_batch([self.vocabulary.to_tokens(block) for block in blocks])
        total = sum(float(sum(result.log_probs)) for result in results)
        return total, sum(len(result.log_probs) for result in results)


class CTranslate2Translator:
    """A CTranslate2 translator folder run by `ctranslate2.Translator` on CPU."""

    runtime = CTRANSLATE2

    def __init__(
        self, folder: str | os.PathLike, *, num_threads: int | None = None, compute_type: str = "default"
    ):
        ctranslate2 = require_ctranslate2()
        self.path = Path(folder)
        self.translator = ctranslate2.Translator(
            str(self.path),
            device="cpu",
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=num_threads or 0,
        )
        shared = (self.path / "shared_vocabulary.json").is_file() or (
            self.path / "shared_vocabulary.txt"
        ).is_file()
        self.source_vocabulary = _Vocabulary(
            self.path, "shared_vocabulary" if shared else "source_vocabulary"
        )
        self.target_vocabulary = _Vocabulary(
            self.path, "shared_vocabulary" if shared else "target_vocabulary"
        )
        self.target_ids = {token: index for index, token in enumerate(self.target_vocabulary.tokens)}
        self.info = deployment_info(self.path) or {}

    @property
    def params(self) -> int | None:
        return self.info.get("params")

    def translate(
        self, sources: Sequence[Sequence[int]], *, max_new_tokens: int = 128, num_beams: int = 1
    ) -> list[list[int]]:
        """Each source (ids, with the tokenizer's end token) translated: target ids without start or end token."""
        results = self.translator.translate_batch(
            [self.source_vocabulary.to_tokens(source) for source in sources],
            beam_size=num_beams,
            max_decoding_length=max_new_tokens,
        )
        return [[self.target_ids[token] for token in result.hypotheses[0]] for result in results]

    def generate(self, sources: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """`translate` greedily (the call the speed and memory measurements make)."""
        return self.translate(sources, max_new_tokens=max_new_tokens)


def load_generation_model(folder: str | os.PathLike, *, num_threads: int | None = None) -> Any:
    """The model in a folder, by what it holds: a CTranslate2 export (model.bin) or a Hugging Face model."""
    folder = Path(folder)
    if (folder / CT2_WEIGHTS).is_file():
        info = deployment_info(folder) or {}
        translator = info.get("task") == "translation" or (folder / "shared_vocabulary.json").is_file()
        cls = CTranslate2Translator if translator else CTranslate2CausalLM
        return cls(folder, num_threads=num_threads)
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} holds neither a CTranslate2 model ({CT2_WEIGHTS}) nor a Hugging Face model."
        )
    config = AutoConfig.from_pretrained(folder)
    cls = TorchTranslator if config.is_encoder_decoder else TorchCausalLM
    return cls(folder, num_threads=num_threads)
