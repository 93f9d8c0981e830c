"""Vocabulary pruning: keep only the tokens the task's data uses, in the model and in its tokenizer.

What "keep the tokens the data uses" means
-------------------------------------------
``tokens_used`` tokenizes the task's texts exactly as the model will see them (same tokenizer, special
tokens added, same truncation) and collects every id that appears, at least ``min_count`` times, with the rest of
every word that truncation cut (data_vocabulary.py: a word that loses a piece tokenizes differently). To that
it adds what must survive whatever the data says, and what the tokenizer's algorithm needs in order to
reproduce those same tokenizations after the unused tokens are gone:

* every special token (cls/sep/pad/unk/mask/bos/eos, extra special tokens, added tokens marked special,
  the ids the post-processor and the padding settings hold);
* BPE: the merge ancestors of every kept token (both parts of every merge that produces it, recursively),
  so the merges that built the kept tokens still apply; the 256-symbol byte alphabet of byte-level BPE
  (GPT-2, RoBERTa, Llama-3) and the ``<0x00>``..``<0xFF>`` tokens of byte-fallback BPE (Llama-2), so any
  text still encodes without loss;
* Unigram: the piece with the lowest score, because the score of the unknown token is computed from it;
  plus the byte-fallback tokens if the model has them;
* WordPiece: for words of the data that came out as the unknown token, the pieces that the greedy
  longest-match took before it failed, so that it still fails at the same place.

``prune_vocabulary`` then builds a new model whose input embedding, LM head (weights, bias and tied
weights) and ``final_logits_bias`` keep only the rows of ``keep_ids``, in that order (new id ``i`` is old
id ``keep_ids[i]``), with the config's ``vocab_size`` and special token ids remapped, and a new fast
tokenizer whose vocabulary is the kept tokens with their new ids.

Why the data is tokenized exactly as before (new ids = old ids mapped through ``keep_ids``):

* WordPiece: greedy longest-match-first. At each position the old tokenizer took the longest vocabulary
  entry; it is kept, and no longer entry exists now that did not exist before, so the new tokenizer takes
  the same one. A word that failed still fails at the same position because its greedy path is kept.
* BPE: merges are applied lowest rank first. Every merge applied on the data produces a symbol that is
  part of a kept token, so it is kept (with its rank order); the kept merges are a subset of the old ones
  in the same order, so at every step the old choice is still the lowest-ranked merge available.
* Unigram: Viterbi picks the segmentation with the highest total score. The old best segmentation is made
  of kept pieces with unchanged scores, and every segmentation now possible was possible before (an
  unknown piece that replaces a removed single character scores lower than that character did), so it
  still wins. The unknown token's score is unchanged because the lowest-scoring piece is kept.
* WordLevel: a lookup per word.

What happens to other text: a piece that is no longer in the vocabulary becomes the unknown token
(WordPiece: the whole word, as WordPiece always does; Unigram: each uncovered character, consecutive ones
fused; WordLevel and char-level BPE with an unk: the word / the character). Byte-level BPE has no unknown
token: the text is encoded with smaller kept pieces, down to single bytes, so it stays lossless; byte-
fallback BPE encodes a character it no longer knows as its UTF-8 byte tokens.

Effect on size: the input embedding is ``vocab x hidden``, and an untied LM head is another
``vocab x hidden`` (+ ``vocab`` bias). For all-MiniLM-L6-v2 (30,522 x 384 = 11.7M of its 22.7M
parameters) the 2,225 BBC News articles use 19,971 tokens with no truncation and 13,828 within the first
128 tokens of each article (13,818 plus 10 pieces of words cut at the 128th token), so pruning removes 4.1M or 6.4M parameters (18% or 28% of the model) and
nothing the task uses. The transformer layers are untouched, so the forward pass is barely faster except
for a large LM head; the gain is memory and file size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging

from hf_distill.compression.pruning.data_vocabulary import tokens_used
from hf_distill.compression.pruning.tokenizer_vocabulary import (
    SUPPORTED_TOKENIZER_MODELS,
    check_vocabulary_keep,
    complete_keep_ids,
    prune_tokenizer,
)

logger = logging.get_logger(__name__)

__all__ = [
    "SUPPORTED_TOKENIZER_MODELS",
    "check_vocabulary_keep",
    "complete_keep_ids",
    "prune_tokenizer",
    "prune_vocabulary",
    "tokens_used",
]


# Config / generation-config attributes that hold one token id (or a list of ids, as eos sometimes does).
_TOKEN_ID_ATTRIBUTES = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
)
# Generation-config lists of ids that only restrict generation: ids that are gone are simply dropped.
_TOKEN_ID_LIST_ATTRIBUTES = ("suppress_tokens", "begin_suppress_tokens")


# ----------------------------------------------------------------------------------------------------
# Pruning the model
# ----------------------------------------------------------------------------------------------------


def _vocabulary_tensors(model: PreTrainedModel, vocab_size: int) -> dict[int, tuple[torch.Tensor, int]]:
    """Every parameter/buffer indexed by token id, by identity -> (tensor, dim holding the vocabulary)."""
    found: dict[int, tuple[torch.Tensor, int]] = {}

    def add(tensor: torch.Tensor | None, dim: int = 0) -> None:
        if tensor is not None and tensor.dim() > dim and tensor.shape[dim] == vocab_size:
            found[id(tensor)] = (tensor, dim)

    add(model.get_input_embeddings().weight)
    output = model.get_output_embeddings()
    if output is not None:
        add(output.weight)
        add(getattr(output, "bias", None))
    # Tied weights (e.g. BertForMaskedLM's cls.predictions.bias -> decoder.bias) name both sides.
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None)
        names = [*tied.keys(), *tied.values()] if isinstance(tied, dict) else list(tied or [])
        for name in names:
            full_name = f"{prefix}.{name}" if prefix else name
            try:
                add(model.get_parameter(full_name))
            except AttributeError:
                continue
    for name, buffer in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "final_logits_bias":
            add(buffer, dim=buffer.dim() - 1)
    return found


def _remap_token_ids(owner: Any, new_id: dict[int, int], where: str) -> None:
    for attribute in _TOKEN_ID_ATTRIBUTES:
        value = getattr(owner, attribute, None)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        missing = [index for index in values if index not in new_id]
        if missing:
            raise ValueError(
                f"{where}.{attribute} = {value} refers to ids {missing} that keep_ids drops; add them to "
                f"keep_ids, or set {where}.{attribute} to the right token first"
            )
        remapped = [new_id[index] for index in values]
        setattr(owner, attribute, remapped if isinstance(value, (list, tuple)) else remapped[0])
    for attribute in _TOKEN_ID_LIST_ATTRIBUTES:
        value = getattr(owner, attribute, None)
        if value:
            setattr(owner, attribute, [new_id[index] for index in value if index in new_id])


def _prune_model(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    input_embeddings = model.get_input_embeddings()
    vocab_size = input_embeddings.weight.shape[0]
    out_of_range = [index for index in keep if index >= vocab_size]
    if out_of_range:
        raise ValueError(
            f"keep_ids has ids {out_of_range[:10]} beyond the model's {vocab_size} embedding rows; the "
            "tokenizer and the model do not match"
        )
    new_id = {old: new for new, old in enumerate(keep)}
    pruned = copy.deepcopy(model)
    # Check the config before touching weights, so a bad config fails without side effects.
    for owner, where in (
        (pruned.config, "config"),
        (getattr(pruned, "generation_config", None), "generation_config"),
    ):
        if owner is not None:
            _remap_token_ids(owner, new_id, where)
    text_config = pruned.config.get_text_config() if hasattr(pruned.config, "get_text_config") else None
    if text_config is not None and text_config is not pruned.config:
        _remap_token_ids(text_config, new_id, "config.text_config")

    replacements: dict[int, nn.Parameter | torch.Tensor] = {}
    for key, (tensor, dim) in _vocabulary_tensors(pruned, vocab_size).items():
        index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
        sliced = tensor.detach().index_select(dim, index).clone()
        is_parameter = isinstance(tensor, nn.Parameter)
        replacements[key] = (
            nn.Parameter(sliced, requires_grad=tensor.requires_grad) if is_parameter else sliced
        )
    # Swap every reference (tied weights are one object shared by several modules).
    for module in pruned.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None and id(tensor) in replacements:
                    table[name] = replacements[id(tensor)]

    embeddings = pruned.get_input_embeddings()
    embeddings.num_embeddings = len(keep)
    if getattr(embeddings, "padding_idx", None) is not None:
        embeddings.padding_idx = new_id.get(embeddings.padding_idx)
    output = pruned.get_output_embeddings()
    if output is not None and hasattr(output, "out_features") and output.weight.shape[0] == len(keep):
        output.out_features = len(keep)
    for config in {id(c): c for c in (pruned.config, text_config) if c is not None}.values():
        for attribute in ("vocab_size", "decoder_vocab_size"):
            if getattr(config, attribute, None) == vocab_size:
                setattr(config, attribute, len(keep))
    pruned.tie_weights()
    return pruned


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def prune_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, keep_ids: Sequence[int]
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A new model and a new fast tokenizer that keep only ``keep_ids``; new id ``i`` is ``keep_ids[i]``.

    The model is a deep copy whose input embedding, LM head (weight, bias, tied weights) and
    ``final_logits_bias`` keep the rows of ``keep_ids`` in that order, with ``config.vocab_size`` and the
    special token ids of the config and generation config remapped. The tokenizer's vocabulary, merges,
    added tokens, post-processor and padding ids are remapped; on text whose tokens are all kept it gives
    exactly the remapped ids. ``keep_ids`` must pass ``check_vocabulary_keep`` (``tokens_used`` does).
    The inputs are not modified.
    """
    keep = [int(index) for index in keep_ids]
    pruned_tokenizer = prune_tokenizer(tokenizer, keep)
    pruned_model = _prune_model(model, keep)
    old_rows = model.get_input_embeddings().weight.shape[0]
    logger.info(
        "vocabulary pruned from %d to %d tokens: %d -> %d parameters",
        old_rows,
        len(keep),
        model.num_parameters(),
        pruned_model.num_parameters(),
    )
    return pruned_model, pruned_tokenizer
