"""Online distillation without a pretrained teacher: Deep Mutual Learning (Zhang et al., 2018).

Two or more peers train together, one optimizer step for all of them. Each peer k minimises its task loss plus a KD
term towards each other peer's softened prediction, the others treated as constants (detached):

    loss_k = (1 - alpha) * task_k + alpha * 1 / (K - 1) * sum_{l != k} kd(peer_k, peer_l)
    loss   = sum_k loss_k

with `kd` the package's `kd_loss` at `temperature` (times T**2), as in the paper's average of the K - 1 KL terms
(the paper uses T = 1 and weights task and KD equally, i.e. alpha = 0.5 up to a factor 2). A batch without labels,
or a row labelled -100, gets the KD terms alone, as in `DistillationTrainer`.

The peers are held by one `PeerModels` module, so the Trainer's optimizer, gradient clipping, checkpoints and resume
cover every peer. Each checkpoint and the final `save_model` write every peer as an ordinary Hugging Face model in
its own folder, `peer_0/`, `peer_1/`, ... (with the tokenizer), which loads without this package; resuming reads
them back. Evaluation reports one peer (`eval_peer`, the first by default); `evaluate_peers` evaluates each.
The classification recipe runs it with `scripts/distill_glue.py --mutual_learning` (tasks/mutual_recipe.py).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments
from hf_distill.losses import logit_distillation_loss
from hf_distill.sources.base import logits_of
from hf_distill.training.checkpoints import resolve_resume
from hf_distill.training.logged_terms import LoggedTerms
from hf_distill.training.task_loss import (
    CAUSAL_LM,
    SEQUENCE,
    TOKEN,
    align_positions,
    hard_label_loss,
    infer_task,
)
from hf_distill.training.teacher import label_permutation, unwrap_model

logger = logging.get_logger(__name__)

PEER_FOLDER = "peer_{}"


class PeerModels(nn.Module):
    """The peers of mutual learning as one module (what the Trainer trains, checkpoints and resumes).

    Its forward runs the first peer (so that tools that call `model(**batch)` get ordinary outputs); the trainer's
    loss runs every peer.
    """

    def __init__(self, peers: Sequence[nn.Module]):
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs: Any):
        return self.peers[0](input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


class MutualLearningTrainer(Trainer):
    """A `Trainer` for Deep Mutual Learning between `peers` (two or more models with the same head and labels).

    Args:
        peers: the models, or a `PeerModels`.
        args: `DistillationTrainingArguments`; `temperature`, `alpha`, `kd_loss` and `jsd_beta` are used, the
            teacher-only settings (hidden/attention matching, logit cache, on-policy steps) must stay off.
        All other arguments are `Trainer`'s (`compute_metrics` sees the evaluated peer's logits).
    """

    def __init__(
        self,
        peers: Sequence[nn.Module] | PeerModels,
        args: DistillationTrainingArguments,
        *trainer_args: Any,
        **trainer_kwargs: Any,
    ):
        model = peers if isinstance(peers, PeerModels) else PeerModels(list(peers))
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"args must be DistillationTrainingArguments (temperature, alpha, kd_loss), got {type(args).__name__}."
            )
        _check_peers(model.peers, args)
        self._task = infer_task(model.peers[0], args.task_type)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # compute_loss returns per-micro-batch means; the Trainer divides them by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.eval_peer = 0
        self._terms = LoggedTerms()

    @property
    def peers(self) -> nn.ModuleList:
        return unwrap_model(self.model).peers

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the columns the peers take (the wrapper's forward takes **kwargs).
        if self._signature_columns is None:
            columns = set(inspect.signature(self.peers[0].forward).parameters)
            self._signature_columns = sorted(columns | {"label", "label_ids", "labels"})

    # ---- the loss ----------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """Sum over peers of (1 - alpha) * task + alpha * mean KD towards the other peers (module docstring); in
        evaluation, the evaluated peer's task loss alone."""
        labels = inputs.get("labels")
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        peers = unwrap_model(model).peers
        if not model.training:
            outputs = peers[self.eval_peer](**model_inputs)
            loss = torch.zeros((), device=self.args.device)
            if labels is not None:
                total, count = self._task_sum(outputs, labels, inputs)
                loss = total / count.clamp(min=1)
            return (loss, outputs) if return_outputs else loss

        outputs = [peer(**model_inputs) for peer in peers]
        aligned = [
            align_positions(self._task.kind, logits_of(out), labels, inputs.get("attention_mask"))
            for out in outputs
        ]
        args, count = self.args, len(peers)
        has_labels = labels is not None
        kd_weight = args.alpha if has_labels else 1.0
        loss = torch.zeros((), device=aligned[0][0].device)
        for index, (positions, peer_labels, mask) in enumerate(aligned):
            kd = sum(
                logit_distillation_loss(
                    positions,
                    other_positions.detach(),
                    temperature=args.temperature,
                    kind=args.kd_loss,
                    beta=args.jsd_beta,
                    mask=mask,
                )
                for other, (other_positions, _, _) in enumerate(aligned)
                if other != index
            ) / (count - 1)
            terms = {f"kd_loss_peer{index}": kd}
            peer_loss = kd_weight * kd
            if has_labels:
                total, items = hard_label_loss(
                    self._task.kind, self._task.problem_type, positions, peer_labels
                )
                terms[f"ce_loss_peer{index}"] = total / items.clamp(min=1)
                peer_loss = peer_loss + (1.0 - args.alpha) * terms[f"ce_loss_peer{index}"]
            loss = loss + peer_loss
            self._terms.add(terms, self.state.global_step, scale=1.0 / self.args.gradient_accumulation_steps)
        return (loss, outputs[0]) if return_outputs else loss

    def _task_sum(self, outputs: Any, labels: torch.Tensor, inputs: dict[str, Any]):
        positions, aligned_labels, _ = align_positions(
            self._task.kind, logits_of(outputs), labels, inputs.get("attention_mask")
        )
        return hard_label_loss(self._task.kind, self._task.problem_type, positions, aligned_labels)

    def evaluate_peers(
        self, eval_dataset: Any = None, metric_key_prefix: str = "eval"
    ) -> list[dict[str, float]]:
        """`evaluate` once per peer; the metrics of peer k are prefixed `<metric_key_prefix>_peer<k>`."""
        results, current = [], self.eval_peer
        try:
            for index in range(len(self.peers)):
                self.eval_peer = index
                results.append(
                    self.evaluate(eval_dataset, metric_key_prefix=f"{metric_key_prefix}_peer{index}")
                )
        finally:
            self.eval_peer = current
        return results

    # ---- logging -----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each peer's loss components (`ce_loss_peer<k>`, `kd_loss_peer<k>`), averaged since the last log."""
        self._terms.flush_into(logs, self.state.global_step)
        super().log(logs, start_time)

    # ---- checkpoints and saving --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest complete checkpoint."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every peer as a loadable Hugging Face model in <output_dir>/peer_<k>, with the tokenizer and the
        training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        for index, peer in enumerate(self.peers):
            folder = os.path.join(output_dir, PEER_FOLDER.format(index))
            unwrap_model(peer).save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        for index, peer in enumerate(self.peers):
            folder = os.path.join(resume_from_checkpoint, PEER_FOLDER.format(index))
            if not os.path.isdir(folder):
                raise ValueError(
                    f"checkpoint {resume_from_checkpoint} has no {PEER_FOLDER.format(index)}/ folder: it was not "
                    f"written by a MutualLearningTrainer with {len(self.peers)} peers."
                )
            saved = type(unwrap_model(peer)).from_pretrained(folder)
            peer.load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _check_peers(peers: nn.ModuleList, args: DistillationTrainingArguments) -> None:
    if len(peers) < 2:
        raise ValueError(f"mutual learning needs at least two peers, got {len(peers)}.")
    if args.hidden_weight > 0 or args.attention_weight > 0 or args.teacher_logits_cache or args.lmbda > 0:
        raise ValueError(
            "MutualLearningTrainer distils the peers' predictions only: set hidden_weight=0, attention_weight=0, "
            "lmbda=0 and no teacher_logits_cache."
        )
    if args.kd_loss == "mse":
        raise ValueError(
            "mutual learning matches softened distributions: use kd_loss forward_kl, reverse_kl or jsd."
        )
    tasks = [infer_task(peer, args.task_type) for peer in peers]
    task = tasks[0]
    if task.kind not in (SEQUENCE, TOKEN, CAUSAL_LM) or task.is_regression or task.is_multi_label:
        raise ValueError(
            f"mutual learning supports softmax heads (single-label sequence classification, token classification, "
            f"causal LMs); the peers are {task.kind} ({task.problem_type})."
        )
    for index, (peer, peer_task) in enumerate(zip(peers, tasks)):
        if peer_task != task:
            raise ValueError(
                f"peer {index} is a {peer_task} model and peer 0 a {task} model: give every peer one head."
            )
        config, first = getattr(peer, "config", None), getattr(peers[0], "config", None)
        if index and config is not None and first is not None and task.kind == SEQUENCE:
            try:
                order = label_permutation(config, first)  # raises when counts or names differ
            except ValueError as error:
                raise ValueError(f"peer {index} and peer 0 have different label spaces: {error}") from error
            if order is not None:
                raise ValueError(
                    f"peer {index} orders its labels {config.id2label} and peer 0 {first.id2label}: give every peer "
                    "the same id2label."
                )
