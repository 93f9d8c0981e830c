"""Which task each training batch comes from: every batch holds rows of one task, its task chosen by a stated rule.

With n_t training rows in task t, batch size B and K tasks, an epoch has sum_t ceil(n_t / B) batches and

- `proportional`: task t fills exactly ceil(n_t / B) of them, in an order shuffled per epoch: tasks are seen in
  proportion to their sizes, every row at least once per epoch;
- `temperature`: each batch's task is drawn independently with p_t proportional to n_t ** (1 / T) (T =
  `sampling_temperature`; T = 1 is proportional in expectation, a large T nearly uniform: small tasks are seen more
  often than their share, as in multilingual training, Arivazhagan et al., 2019);
- `round_robin`: the tasks take turns, t_0, t_1, ..., t_{K-1}, t_0, ...: every task equally often.

Rows come from each task's own stream: its rows shuffled, then shuffled again each time they are used up, so a batch
is always full (B rows of one task). Everything is drawn from (seed, epoch) alone, so an epoch is the same whether
the run started there or resumed in its middle (the Trainer skips the batches already trained on).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

SAMPLING_RULES = ("proportional", "temperature", "round_robin")


def _check_rule(rule: str, temperature: float) -> None:
    if rule not in SAMPLING_RULES:
        raise ValueError(f"sampling rule must be one of {SAMPLING_RULES}, got {rule!r}.")
    if rule == "temperature" and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"sampling_temperature must be > 0, got {temperature!r}.")


def task_probabilities(sizes: Mapping[str, int], rule: str, temperature: float = 2.0) -> dict[str, float]:
    """The share of batches each task gets under `rule` (in expectation; exactly, for proportional and
    round-robin up to rounding)."""
    _check_rule(rule, temperature)
    if rule == "round_robin":
        return {name: 1.0 / len(sizes) for name in sizes}
    exponent = 1.0 if rule == "proportional" else 1.0 / temperature
    weights = {name: float(size) ** exponent for name, size in sizes.items()}
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


class TaskBatchSampler(torch.utils.data.Sampler):
    """Batches of row indices into the tasks' rows laid end to end (task k's rows at `offsets[k]` onwards), each
    batch of one task, by `rule` (module docstring). `set_epoch(e)` selects the epoch (the Trainer calls it)."""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        rule: str = "proportional",
        *,
        temperature: float = 2.0,
        seed: int = 0,
    ):
        _check_rule(rule, temperature)
        sizes = [int(size) for size in sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every task needs at least one training row; got sizes {sizes}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.sizes, self.batch_size, self.rule = sizes, batch_size, rule
        self.temperature, self.seed, self.epoch = temperature, seed, 0
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.batches_per_task = [math.ceil(size / batch_size) for size in sizes]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.batches_per_task)

    def task_order(self, epoch: int) -> list[int]:
        """The task index of each batch of `epoch`."""
        rng = random.Random(f"{self.seed}-{epoch}-order")
        count, tasks = len(self), range(len(self.sizes))
        if self.rule == "proportional":
            order = [task for task in tasks for _ in range(self.batches_per_task[task])]
            rng.shuffle(order)
            return order
        if self.rule == "round_robin":
            return [index % len(self.sizes) for index in range(count)]
        weights = [size ** (1.0 / self.temperature) for size in self.sizes]
        return rng.choices(list(tasks), weights=weights, k=count)

    def _rows(self, task: int, epoch: int) -> Iterator[int]:
        """Task `task`'s rows (as global indices) for ever: a fresh shuffle each time they are used up."""
        passes = 0
        while True:
            rows = list(range(self.sizes[task]))
            random.Random(f"{self.seed}-{epoch}-{task}-{passes}").shuffle(rows)
            for row in rows:
                yield self.offsets[task] + row
            passes += 1

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._rows(task, self.epoch) for task in range(len(self.sizes))]
        for task in self.task_order(self.epoch):
            yield [next(streams[task]) for _ in range(self.batch_size)]


class MultiTaskDataset(torch.utils.data.Dataset):
    """The tasks' datasets end to end; row i of task k (index `offsets[k] + i`) is that row with `task_id` = k.
    Only the model's input columns and `labels` are kept (`columns`)."""

    COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def __init__(self, datasets: Sequence[Any], columns: Sequence[str] = COLUMNS):
        self.datasets = list(datasets)
        self.columns = tuple(columns)
        self.sizes = [len(dataset) for dataset in self.datasets]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        task = max(k for k, offset in enumerate(self.offsets) if offset <= index and self.sizes[k] > 0)
        row = self.datasets[task][index - self.offsets[task]]
        item = {key: value for key, value in row.items() if key in self.columns}
        item["task_id"] = task
        return item
