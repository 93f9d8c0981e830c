"""The tokenizer side of vocabulary pruning: which ids a tokenizer needs to reproduce the kept tokens
(`complete_keep_ids`, `check_vocabulary_keep`) and a fast tokenizer restricted to them (`prune_tokenizer`), by
editing the `tokenizers` JSON. Which ids the data uses is `data_vocabulary.tokens_used`.

hf_distill/pruning/vocabulary.py explains what is kept and why the data tokenizes exactly as before.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from hf_distill.compression.pruning.portable_tokenizer import PortableTokenizerFast

logger = logging.get_logger(__name__)

__all__ = ["check_vocabulary_keep", "complete_keep_ids", "prune_tokenizer"]

SUPPORTED_TOKENIZER_MODELS = ("WordPiece", "BPE", "Unigram", "WordLevel")

_BYTE_FALLBACK_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))


# ----------------------------------------------------------------------------------------------------
# Reading the tokenizer
# ----------------------------------------------------------------------------------------------------


class _TokenizerState:
    """The `tokenizers` JSON of a fast tokenizer, with the id <-> token maps the pruning needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise ValueError(
                f"vocabulary pruning needs a fast tokenizer backed by the `tokenizers` library, got "
                f"{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.backend = backend
        self.state: dict[str, Any] = json.loads(backend.to_str())
        self.model: dict[str, Any] = self.state["model"]
        self.kind: str = self.model["type"]
        if self.kind not in SUPPORTED_TOKENIZER_MODELS:
            raise ValueError(
                f"vocabulary pruning supports tokenizer models {SUPPORTED_TOKENIZER_MODELS}, this tokenizer's "
                f"model is {self.kind!r}; prune its vocabulary by hand or skip vocabulary pruning"
            )
        if self.kind == "Unigram":
            self.model_vocab = {piece: index for index, (piece, _score) in enumerate(self.model["vocab"])}
        else:
            self.model_vocab = dict(self.model["vocab"])
        self.id_to_token: dict[int, str] = {index: token for token, index in self.model_vocab.items()}
        # Added tokens that are not in the model vocabulary get ids after it; read the live ids.
        for index, added in backend.get_added_tokens_decoder().items():
            self.id_to_token.setdefault(index, added.content)

    def token(self, index: int) -> str:
        return self.id_to_token[index]

    def id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- what must always be kept ---------------------------------------------------------------------

    def special_ids(self) -> dict[int, str]:
        """Ids that must survive pruning, with the reason: special tokens and ids the pipeline holds."""
        required: dict[int, str] = {}
        for attribute in self.tokenizer.SPECIAL_TOKENS_ATTRIBUTES:
            token = getattr(self.tokenizer, attribute, None)
            if token is not None and self.id(str(token)) is not None:
                required.setdefault(self.id(str(token)), f"{attribute} {str(token)!r}")
        for token in getattr(self.tokenizer, "extra_special_tokens", None) or []:
            if self.id(str(token)) is not None:
                required.setdefault(self.id(str(token)), f"extra special token {str(token)!r}")
        for added in self.state.get("added_tokens") or []:
            if added.get("special"):
                index = self.id(added["content"])
                required.setdefault(index, f"special added token {added['content']!r}")
        for token, index in _post_processor_ids(self.state.get("post_processor")):
            required.setdefault(index, f"post-processor token {token!r}")
        padding = self.state.get("padding")
        if padding is not None:
            required.setdefault(padding["pad_id"], f"padding token {padding['pad_token']!r}")
        unk = self.unk_token()
        if unk is not None:
            required.setdefault(self.model_vocab[unk], f"the {self.kind} model's unknown token {unk!r}")
        return required

    def unk_token(self) -> str | None:
        if self.kind == "Unigram":
            unk_id = self.model.get("unk_id")
            return None if unk_id is None else self.model["vocab"][unk_id][0]
        unk = self.model.get("unk_token")
        return unk if unk in self.model_vocab else None

    def algorithm_requirements(self, keep: set[int]) -> dict[int, str]:
        """Ids (not in ``keep``) that the tokenizer model needs to reproduce the kept tokens, with reasons."""
        required: dict[int, str] = {}
        if self.kind == "BPE":
            for token in self._bpe_ancestors({self.token(i) for i in keep}):
                required[self.model_vocab[token]] = f"BPE merge ancestor {token!r} of a kept token"
            if _has_byte_level(self.state.get("pre_tokenizer")):
                for token in pre_tokenizers.ByteLevel.alphabet():
                    if token in self.model_vocab:
                        required.setdefault(self.model_vocab[token], f"byte-level alphabet symbol {token!r}")
        if self.kind == "Unigram":
            scores = [score for _piece, score in self.model["vocab"]]
            lowest = min(range(len(scores)), key=scores.__getitem__)
            required[lowest] = (
                f"lowest-scoring Unigram piece {self.model['vocab'][lowest][0]!r} "
                "(the unknown token's score is computed from it)"
            )
        if self.kind in ("BPE", "Unigram") and self.model.get("byte_fallback"):
            for token in _BYTE_FALLBACK_TOKENS:
                if token in self.model_vocab:
                    required.setdefault(self.model_vocab[token], f"byte-fallback token {token!r}")
        return {index: reason for index, reason in required.items() if index not in keep}

    # -- BPE merges -----------------------------------------------------------------------------------

    def bpe_merges(self) -> list[tuple[str, str, str]]:
        """(left, right, result) for every merge, in rank order, computed as the `tokenizers` BPE does."""
        prefix = (self.model.get("continuing_subword_prefix") or "").encode()
        merges = []
        for merge in self.model["merges"]:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            result = (left.encode() + right.encode()[len(prefix) :]).decode()
            merges.append((left, right, result))
        return merges

    def _bpe_ancestors(self, tokens: set[str]) -> set[str]:
        producers: dict[str, list[tuple[str, str]]] = {}
        for left, right, result in self.bpe_merges():
            producers.setdefault(result, []).append((left, right))
        closure, frontier = set(tokens), list(tokens)
        while frontier:
            for pair in producers.get(frontier.pop(), ()):
                for part in pair:
                    if part not in closure and part in self.model_vocab:
                        closure.add(part)
                        frontier.append(part)
        return closure - tokens


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])


def _post_processor_ids(processor: dict | None) -> Iterator[tuple[str, int]]:
    """(token, id) pairs held by a post-processor (TemplateProcessing, Bert/RobertaProcessing, Sequence)."""
    if not processor:
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            yield from zip(special["tokens"], special["ids"])
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("cls", "sep"):
            token, index = processor[key]
            yield token, index
    elif kind == "Sequence":
        for inner in processor["processors"]:
            yield from _post_processor_ids(inner)


def _remap_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    if not processor:
        return
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for special in processor["special_tokens"].values():
            special["ids"] = [new_id[index] for index in special["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("cls", "sep"):
            token, index = processor[key]
            processor[key] = [token, new_id[index]]
    elif kind == "Sequence":
        for inner in processor["processors"]:
            _remap_post_processor(inner, new_id)


# ----------------------------------------------------------------------------------------------------
# Choosing and checking the ids to keep
# ----------------------------------------------------------------------------------------------------


def complete_keep_ids(tokenizer: PreTrainedTokenizerFast, keep_ids: Iterable[int]) -> list[int]:
    """``keep_ids`` plus the special tokens and what the tokenizer's algorithm needs, sorted.

    Sorted order also puts the added tokens that live outside the model vocabulary last, as
    ``check_vocabulary_keep`` requires.
    """
    view = _TokenizerState(tokenizer)
    keep = set(int(i) for i in keep_ids) | set(view.special_ids())
    # BPE ancestors of the byte alphabet are themselves, so one pass is a fixed point; loop for safety.
    while missing := view.algorithm_requirements(keep):
        keep |= set(missing)
    return sorted(keep)


def _describe(reasons: dict[int, str], limit: int = 8) -> str:
    items = [f"{reason} (id {index})" for index, reason in sorted(reasons.items())[:limit]]
    more = f" and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return ", ".join(items) + more


def check_vocabulary_keep(tokenizer: PreTrainedTokenizerFast, keep_ids: Sequence[int]) -> None:
    """Raise ValueError, naming the problem and the fix, if ``keep_ids`` cannot be pruned to.

    Checks: non-empty, no duplicates, every id exists in the tokenizer, every special token is kept
    (cls/sep/pad/unk/mask/bos/eos, extra special tokens, special added tokens, post-processor and padding
    ids), the tokenizer algorithm's requirements are kept (BPE merge ancestors and byte alphabet, byte-
    fallback tokens, Unigram's lowest-scoring piece), and added tokens outside the model vocabulary come
    after all model-vocabulary tokens (the `tokenizers` library numbers them after the vocabulary).
    """
    view = _TokenizerState(tokenizer)
    keep = [int(i) for i in keep_ids]
    if not keep:
        raise ValueError("keep_ids is empty; pass tokens_used(tokenizer, texts) for the task's texts")
    duplicates = sorted(index for index, count in Counter(keep).items() if count > 1)
    if duplicates:
        raise ValueError(f"keep_ids repeats ids {duplicates[:10]}; each kept id must appear once")
    unknown = sorted(index for index in keep if index not in view.id_to_token)
    if unknown:
        raise ValueError(
            f"keep_ids has ids {unknown[:10]} that are out of range: the tokenizer has {len(view.id_to_token)} "
            f"tokens with ids 0..{max(view.id_to_token)}; pass ids produced by this tokenizer"
        )
    keep_set = set(keep)
    missing_special = {i: r for i, r in view.special_ids().items() if i not in keep_set}
    if missing_special:
        raise ValueError(
            f"keep_ids drops special tokens: {_describe(missing_special)}; the tokenizer and the model "
            "need them: add these ids (tokens_used always includes them, complete_keep_ids adds them)"
        )
    missing_algorithm = view.algorithm_requirements(keep_set)
    if missing_algorithm:
        raise ValueError(
            f"keep_ids lacks tokens the {view.kind} tokenizer needs to reproduce the kept tokens: "
            f"{_describe(missing_algorithm)}; add them with complete_keep_ids(tokenizer, keep_ids)"
        )
    in_model = [view.token(index) in view.model_vocab for index in keep]
    first_added = next((position for position, inside in enumerate(in_model) if not inside), len(keep))
    if any(in_model[first_added:]):
        added = keep[first_added]
        raise ValueError(
            f"keep_ids puts added token {view.token(added)!r} (id {added}), which is not in the {view.kind} "
            f"model vocabulary, at new id {first_added}, before model-vocabulary tokens; the `tokenizers` "
            "library numbers added tokens after the model vocabulary, so put them last (sorted ids do)"
        )


# ----------------------------------------------------------------------------------------------------
# Pruning the tokenizer
# ----------------------------------------------------------------------------------------------------


def _pruned_model_section(view: _TokenizerState, keep: list[int]) -> dict[str, Any]:
    model = copy.deepcopy(view.model)
    kept_tokens = [view.token(index) for index in keep if view.token(index) in view.model_vocab]
    new_id = {token: position for position, token in enumerate(kept_tokens)}
    if view.kind == "Unigram":
        model["vocab"] = [view.model["vocab"][view.model_vocab[token]] for token in kept_tokens]
        if view.model.get("unk_id") is not None:
            model["unk_id"] = new_id[view.unk_token()]
        return model
    model["vocab"] = new_id
    if view.kind == "BPE":
        kept_merges = [
            merge
            for merge, (left, right, result) in zip(view.model["merges"], view.bpe_merges())
            if left in new_id and right in new_id and result in new_id
        ]
        model["merges"] = kept_merges
    return model


def prune_tokenizer(tokenizer: PreTrainedTokenizerFast, keep_ids: Sequence[int]) -> PreTrainedTokenizerFast:
    """The tokenizer half of ``prune_vocabulary``: a new fast tokenizer whose id ``i`` is ``keep_ids[i]``."""
    keep = [int(index) for index in keep_ids]
    check_vocabulary_keep(tokenizer, keep)
    view = _TokenizerState(tokenizer)
    new_id = {old: new for new, old in enumerate(keep)}
    state = copy.deepcopy(view.state)
    state["model"] = _pruned_model_section(view, keep)
    added_tokens = []
    for added in state.get("added_tokens") or []:
        old = view.id(added["content"])
        if old in new_id:
            added_tokens.append({**added, "id": new_id[old]})
    state["added_tokens"] = sorted(added_tokens, key=lambda added: added["id"])
    _remap_post_processor(state.get("post_processor"), new_id)
    if state.get("padding") is not None:
        state["padding"]["pad_id"] = new_id[state["padding"]["pad_id"]]
    backend = Tokenizer.from_str(json.dumps(state))

    init_kwargs: dict[str, Any] = {
        attribute: str(getattr(tokenizer, attribute))
        for attribute in tokenizer.SPECIAL_TOKENS_ATTRIBUTES
        if getattr(tokenizer, attribute, None) is not None
    }
    extra = [str(token) for token in getattr(tokenizer, "extra_special_tokens", None) or []]
    if extra:
        init_kwargs["extra_special_tokens"] = extra
    for attribute in ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces"):
        init_kwargs[attribute] = getattr(tokenizer, attribute)
    init_kwargs["model_input_names"] = list(tokenizer.model_input_names)
    if getattr(tokenizer, "chat_template", None):
        init_kwargs["chat_template"] = tokenizer.chat_template
    # Saved as PreTrainedTokenizerFast, which transformers 4 loads too (portable_tokenizer.py).
    pruned = PortableTokenizerFast(tokenizer_object=backend, **init_kwargs)

    # The contract: new id i is old id keep[i]. Verify it rather than trust the library's numbering.
    old_tokens = tokenizer.convert_ids_to_tokens(keep)
    new_tokens = pruned.convert_ids_to_tokens(list(range(len(keep))))
    if old_tokens != new_tokens or len(pruned) != len(keep):
        wrong = next((i for i, (a, b) in enumerate(zip(old_tokens, new_tokens)) if a != b), len(keep))
        raise RuntimeError(
            f"pruned tokenizer numbers its {len(pruned)} tokens differently from keep_ids ({len(keep)} ids; "
            f"first difference at new id {wrong}); this tokenizer layout is not supported by vocabulary pruning"
        )
    return pruned
