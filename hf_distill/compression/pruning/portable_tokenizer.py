"""Tokenizer folders that transformers 4 and 5 both load.

`save_pretrained` writes the tokenizer's class name into tokenizer_config.json, and `AutoTokenizer` of the reading
version looks that name up. A fast tokenizer built from a `tokenizers` object is, in transformers 5, a
`TokenizersBackend` (`PreTrainedTokenizerFast` is an alias of it), so its folder says
``"tokenizer_class": "TokenizersBackend"``, a class transformers 4 does not have: optimum (optimum-onnx requires
transformers < 4.58) and any transformers-4 `pipeline()` then fail on the folder. Both versions load a folder that
says ``"PreTrainedTokenizerFast"`` from its tokenizer.json, identically. So a pruned tokenizer is a
`PortableTokenizerFast` (saved under that name), and `make_tokenizer_folder_portable` renames the class in a folder
that a reloaded `TokenizersBackend` was saved into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerFast as _GenericFastTokenizer

from hf_distill.storage.atomic import atomic_write_text

__all__ = ["PORTABLE_TOKENIZER_CLASS", "PortableTokenizerFast", "make_tokenizer_folder_portable"]

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Class names transformers 5 writes for a generic `tokenizers`-backed tokenizer, which transformers 4 lacks.
_VERSION_5_ONLY = ("TokenizersBackend",)


class PreTrainedTokenizerFast(_GenericFastTokenizer):
    """transformers' generic fast tokenizer, saved as ``"tokenizer_class": "PreTrainedTokenizerFast"``.

    `save_pretrained` records ``type(self).__name__``, hence this class's name (pickling finds it under the same
    name in this module); it behaves exactly as its base class and loads back with `AutoTokenizer` as that class.
    """


PortableTokenizerFast = PreTrainedTokenizerFast


def make_tokenizer_folder_portable(folder: str | os.PathLike) -> bool:
    """Rename a transformers-5-only tokenizer class in `folder`/tokenizer_config.json to PreTrainedTokenizerFast
    (atomically); True when the file was changed. Nothing else in the file changes."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in _VERSION_5_ONLY:
        return False
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return True
