"""The sentence-transformers folder format, read and written without sentence-transformers installed.

A folder holds `modules.json`, a list of modules applied in order, each with its files in its own path:

    Transformer   ""            config.json, model.safetensors, the tokenizer, sentence_bert_config.json
    Pooling       1_Pooling     config.json: the pooling mode and the token embeddings' width
    Dense         2_Dense       config.json (in/out features, bias, activation) and model.safetensors
    Normalize     3_Normalize   no files
    plus config_sentence_transformers.json (prompts, similarity function, versions) and README.md.

`load_sentence_embedder` reads such a folder into a `SentenceEmbedder` (or a plain transformers model with the
pooling given by the caller: a folder without pooling information is refused, naming the flag to set).
`save_sentence_embedder` writes one, atomically, mirroring the teacher's files (`FolderFormat`), so that
`sentence_transformers.SentenceTransformer(path)` loads it and `transformers.AutoModel.from_pretrained(path)` loads
its encoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

from hf_distill.embeddings.model import DenseLayer, FolderFormat, SentenceEmbedder
from hf_distill.embeddings.pooling import pooling_config, pooling_mode_of
from hf_distill.storage.atomic import atomic_directory

logger = logging.get_logger(__name__)

MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"
MODEL_CONFIG = "config_sentence_transformers.json"
_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# The module types written into modules.json: the paths every sentence-transformers version resolves.
_MODULE_TYPES = {name: f"sentence_transformers.models.{name}" for name in _KNOWN_MODULES}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _module_kind(entry: dict[str, Any], folder: Path) -> str:
    kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
    if kind not in _KNOWN_MODULES:
        raise ValueError(
            f"{folder / MODULES_FILE} lists a {entry.get('type')!r} module; hf_distill reads sentence-transformers "
            f"folders made of {', '.join(_KNOWN_MODULES)} modules."
        )
    return kind


def _no_pooling_error(folder: Path) -> ValueError:
    return ValueError(
        f"{folder} has no sentence-transformers pooling configuration ({MODULES_FILE} with a Pooling module), so "
        "how its token embeddings become one sentence embedding is unknown. Pass --pooling mean|cls|max|"
        "mean_sqrt_len_tokens|lasttoken (pooling= in Python), and --normalize if its embeddings are unit length."
    )


def load_sentence_embedder(
    path: str | os.PathLike,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_seq_length: int | None = None,
) -> tuple[SentenceEmbedder, Any]:
    """(SentenceEmbedder, tokenizer) from a sentence-transformers folder, or from a transformers model folder with
    `pooling` given. `pooling`, `normalize` and `max_seq_length` override what the folder says (with a warning where
    they disagree); a folder that says nothing about pooling needs `pooling`, else ValueError before any weights
    are read. The model is in eval mode."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a model folder (no such directory).")
    modules = _read_json(folder / MODULES_FILE) if (folder / MODULES_FILE).is_file() else []
    kinds = [(_module_kind(entry, folder), entry) for entry in modules]
    if pooling is None and not any(kind == "Pooling" for kind, _ in kinds):
        raise _no_pooling_error(folder)
    transformer_path = next(
        (folder / entry.get("path", "") for kind, entry in kinds if kind == "Transformer"), folder
    )
    folder_format = FolderFormat(
        sentence_bert_config=_read_json(transformer_path / SENTENCE_BERT_CONFIG),
        model_config=_read_json(folder / MODEL_CONFIG),
    )
    mode, dense_layers, folder_normalize = None, [], False
    for kind, entry in kinds:
        where = folder / entry.get("path", "")
        if kind == "Pooling":
            folder_format.pooling_config = _read_json(where / "config.json")
            mode = pooling_mode_of(folder_format.pooling_config, str(where / "config.json"))
        elif kind == "Dense":
            dense_layers.append(_load_dense(where))
        elif kind == "Normalize":
            folder_normalize = True
    if pooling is not None and mode is not None and pooling != mode:
        logger.warning(f"{folder} pools by {mode!r}; using pooling={pooling!r} as asked.")
    if normalize is not None and mode is not None and normalize != folder_normalize:
        logger.warning(f"{folder} has normalize={folder_normalize}; using normalize={normalize} as asked.")
    encoder = AutoModel.from_pretrained(transformer_path)
    tokenizer = AutoTokenizer.from_pretrained(transformer_path)
    folder_length = folder_format.sentence_bert_config.get("max_seq_length")
    model = SentenceEmbedder(
        encoder,
        pooling or mode,
        dense_layers=dense_layers,
        normalize=folder_normalize if normalize is None else normalize,
        max_seq_length=max_seq_length or folder_length,
        folder_format=folder_format,
    )
    return model.eval(), tokenizer


def _load_dense(where: Path) -> DenseLayer:
    config = _read_json(where / "config.json")
    try:
        layer = DenseLayer(
            int(config["in_features"]),
            int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            # sentence-transformers' Dense defaults to Tanh when the config names no activation
            activation=config.get("activation_function", "torch.nn.modules.activation.Tanh"),
        )
    except KeyError as error:
        raise ValueError(f"{where / 'config.json'} lacks {error.args[0]!r}.") from None
    weights_file = where / "model.safetensors"
    if weights_file.is_file():
        state = load_file(weights_file)
    elif (where / "pytorch_model.bin").is_file():
        state = torch.load(where / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{where} has no model.safetensors or pytorch_model.bin for its Dense weights.")
    layer.load_state_dict(state)
    return layer


def save_sentence_embedder(
    model: SentenceEmbedder,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    card: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `model` as a sentence-transformers folder at `path` (atomically: the previous folder, if any, stays
    until the new one is complete) and return the path. Its Pooling config, sentence_bert_config.json and
    config_sentence_transformers.json are the ones it was loaded with (for a student: its teacher's), with its own
    width and max_seq_length; `card` becomes README.md."""
    target = Path(path)
    with atomic_directory(target, overwrite=overwrite) as temporary:
        model.encoder.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        folder_format = model.folder_format
        sentence_bert = {"max_seq_length": model.max_seq_length, "do_lower_case": False}
        sentence_bert.update(
            {k: v for k, v in folder_format.sentence_bert_config.items() if k != "max_seq_length"}
        )
        if model.max_seq_length is None:
            sentence_bert.pop("max_seq_length")
        _write_json(temporary / SENTENCE_BERT_CONFIG, sentence_bert)
        _write_json(temporary / MODEL_CONFIG, folder_format.model_config or {"similarity_fn_name": "cosine"})
        modules = [_module(0, "Transformer", "")]
        (temporary / POOLING_DIR).mkdir()
        _write_json(
            temporary / POOLING_DIR / "config.json",
            pooling_config(model.pooling, model.hidden_size, like=folder_format.pooling_config),
        )
        modules.append(_module(1, "Pooling", POOLING_DIR))
        for layer in model.dense_layers:
            index = len(modules)
            where = temporary / f"{index}_Dense"
            where.mkdir()
            _write_json(where / "config.json", layer.config())
            weights = {
                name: tensor.detach().cpu().contiguous() for name, tensor in layer.linear.state_dict().items()
            }
            save_file(
                {f"linear.{name}": tensor for name, tensor in weights.items()},
                str(where / "model.safetensors"),
            )
            modules.append(_module(index, "Dense", where.name))
        if model.normalize:
            modules.append(_module(len(modules), "Normalize", f"{len(modules)}_Normalize"))
            (temporary / modules[-1]["path"]).mkdir()
        _write_json(temporary / MODULES_FILE, modules)
        if card is not None:
            (temporary / "README.md").write_text(card, encoding="utf-8")
    logger.info(f"Saved a sentence-transformers folder to {target} ({', '.join(m['type'] for m in modules)})")
    return target


def _module(index: int, kind: str, path: str) -> dict[str, Any]:
    return {"idx": index, "name": str(index), "path": path, "type": _MODULE_TYPES[kind]}


def _write_json(path: Path, values: Any) -> None:
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def embedder_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of a sentence-transformers folder's weights: the encoder's files and every Dense module's."""
    from hf_distill.storage.sizes import size_on_disk

    folder = Path(path)
    total = size_on_disk(folder)
    for entry in _read_json(folder / MODULES_FILE) if (folder / MODULES_FILE).is_file() else []:
        if str(entry.get("type", "")).endswith("Dense"):
            total += sum(
                p.stat().st_size for p in (folder / entry["path"]).glob("*") if p.name != "config.json"
            )
    return total
