"""The embedding recipe's texts: unlabelled training text cut into windows the models read whole, and the labelled
index and query articles of the evaluation (topic labels only)."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class EmbeddingTexts:
    """train: unlabelled windows; index_*: the labelled reference texts k-NN votes with and retrieval searches;
    eval_*: the queries (each classified by its neighbours in the index, and retrieving from it)."""

    train: list[str]
    index_texts: list[str]
    index_labels: list[str]
    eval_texts: list[str]
    eval_labels: list[str]
    description: str


def _read_csv(path: str, columns: Sequence[str], flag: str) -> dict[str, list[str]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{flag} {path!r} has columns {reader.fieldnames} but no {missing}; the embedding recipe reads "
                f"{list(columns)}: rename them."
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{flag} {path!r} has no rows.")
    return {column: [row[column] for row in rows] for column in columns}


def _read_train(path: str) -> list[str]:
    if Path(path).suffix.lower() == ".txt":
        if not Path(path).is_file():
            raise FileNotFoundError(f"--train_file {path!r} does not exist.")
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        return [text for text in texts if text]
    return _read_csv(path, ["text"], "--train_file")["text"]


def passages(texts: Sequence[str], tokenizer: Any, max_length: int, per_text: int) -> list[str]:
    """Each text cut into consecutive windows that fill `max_length` tokens with the special tokens, at most
    `per_text` of them (the first ones), as substrings of the text (character offsets of the tokens)."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    encoded = tokenizer(
        list(texts), add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
    )
    windows = []
    for text, offsets in zip(texts, encoded["offset_mapping"]):
        for start in range(0, len(offsets), room)[:per_text]:
            chunk = offsets[start : start + room]
            window = text[chunk[0][0] : chunk[-1][1]].strip()
            if window:
                windows.append(window)
    return windows


def load_texts(data_args: Any, output_dir: str, tokenizer: Any, seed: int) -> EmbeddingTexts:
    """The recipe's texts from --bbc_demo or the files; training windows shuffled with `seed`, then cut to
    --max_train_texts; index and queries cut to --max_eval_texts each."""
    if data_args.bbc_demo:
        from hf_distill.tasks.classification.bbc import prepare_bbc_splits

        data_dir = Path(data_args.data_dir or Path(output_dir) / "data")
        paths = prepare_bbc_splits(data_dir, data_args.split_seed)
        train = _read_csv(paths["train"], ["text", "label"], "train.csv")
        validation = _read_csv(paths["validation"], ["text"], "validation.csv")
        test = _read_csv(paths["test"], ["text", "label"], "test.csv")
        articles = train["text"] + validation["text"]
        index, queries = train, test
        description = (
            f"BBC News (split seed {data_args.split_seed}): training text = {len(articles)} train + validation "
            f"articles (no labels); index = {len(train['text'])} train articles, queries = {len(test['text'])} "
            "test articles (topics)"
        )
    else:
        articles = _read_train(data_args.train_file)
        index = _read_csv(data_args.index_file, ["text", "label"], "--index_file")
        queries = _read_csv(data_args.eval_file, ["text", "label"], "--eval_file")
        description = f"training text {data_args.train_file}; index {data_args.index_file}; queries {data_args.eval_file}"
    windows = passages(articles, tokenizer, data_args.max_seq_length, data_args.passages_per_text)
    random.Random(seed).shuffle(windows)
    if data_args.max_train_texts is not None:
        windows = windows[: data_args.max_train_texts]
    if not windows:
        raise ValueError("no training text: the training file gave no non-empty text.")
    limit = data_args.max_eval_texts
    if limit is not None and (len(index["text"]) > limit or len(queries["text"]) > limit):
        description += (
            f"; evaluation cut to the first {limit} index and {limit} query texts (--max_eval_texts)"
        )
    texts = EmbeddingTexts(
        train=windows,
        index_texts=index["text"][:limit],
        index_labels=index["label"][:limit],
        eval_texts=queries["text"][:limit],
        eval_labels=queries["label"][:limit],
        description=f"{description}; {len(windows)} training windows of <= {data_args.max_seq_length} tokens "
        f"(<= {data_args.passages_per_text} per article)",
    )
    logger.info(texts.description)
    return texts


def tokenized(texts: Sequence[str], tokenizer: Any, max_length: int) -> Any:
    """A `datasets.Dataset` of the tokenized texts (input_ids, attention_mask, token_type_ids where the tokenizer
    gives them), unpadded; no text or label column."""
    from datasets import Dataset

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return Dataset.from_dict({key: list(values) for key, values in encoded.items()})


def batches(
    texts: Sequence[str], tokenizer: Any, max_length: int, batch_size: int = 32, tensors: str = "pt"
) -> list:
    """Padded tokenized batches of `texts` (torch tensors, or numpy arrays with tensors='np')."""
    return [
        dict(tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                       max_length=max_length, return_tensors=tensors))
        for start in range(0, len(texts), batch_size)
    ]  # fmt: skip
