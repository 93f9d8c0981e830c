"""One distillation setting written in each toolkit's own terms, and the conversions between their conventions.

bench_toolkits.py runs the same work (a frozen teacher, a student, logit KD at temperature T with weight alpha,
hidden-state matching over fixed layer pairs through learned student -> teacher projections, the same batches,
optimizer and schedule) through hf_distill's DistillationTrainer, TextBrewer's GeneralDistiller and torchdistill;
tests/benchmarks/test_toolkit_conventions.py checks that the conversions below make their losses agree.

The conventions, as each toolkit's source computes them:

    hf_distill    (1 - alpha) * CE(labels) + alpha * T^2 * KL(p_T || p_S) + hidden_weight * mean over pairs of
                  hidden_loss(proj(h_S), h_T); KL and CE averaged over the batch, the hidden loss over real
                  (unpadded) positions.
    TextBrewer    hard_label_weight * (the adaptor's `losses`) + kd_loss_weight * kd_ce_loss + sum over
                  intermediate_matches of weight * loss, with kd_ce_loss = -sum p_T log p_S at temperature T,
                  averaged over the batch: a cross-entropy, not a KL, and no T^2. So hard_label_weight = 1 - alpha,
                  kd_loss_weight = alpha * T^2 and each match's weight = hidden_weight / number of pairs give the
                  same gradients, and TextBrewer's loss value is ours plus alpha * T^2 * H(p_T), the teacher's
                  mean entropy at T (a constant for the student). hidden_mse with `inputs_mask` is the mean over
                  hidden units and real positions, as ours.
    torchdistill  KDLoss: alpha * CE + (1 - alpha) * T^2 * KL(batchmean): its alpha weights the labels, ours the
                  teacher, so torchdistill's alpha = 1 - ours.

Everything here except the `build_*` functions is instrumentation shared by the benchmark; the `build_*` functions
are the user code each toolkit needs, and their lines are what the benchmark counts.
"""

from __future__ import annotations

import ast
import inspect
import math
import resource
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TOOLKITS = ("hf_distill", "textbrewer", "torchdistill")
# TextBrewer's names (its presets.MATCH_LOSS_MAP) for the hidden-state distances hf_distill offers.
TEXTBREWER_HIDDEN_LOSS = {"mse": "hidden_mse", "cosine": "cos"}


@dataclass(frozen=True)
class Setting:
    """The work every toolkit does: loss terms, layer pairs and the optimisation, in hf_distill's conventions."""

    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; the labels get 1 - alpha
    hidden_weight: float = 1.0
    hidden_loss: str = "mse"
    layer_pairs: tuple[
        tuple[int, int], ...
    ] = ()  # (student, teacher) indices into hidden_states; 0 = embeddings
    student_width: int = 384
    teacher_width: int = 384
    steps: int = 90
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def warmup_steps(self) -> int:
        """As transformers.TrainingArguments.get_warmup_steps reads a ratio: ceil(steps * ratio)."""
        return math.ceil(self.steps * self.warmup_ratio)

    @property
    def layer_map(self) -> str:
        return ",".join(f"{student}:{teacher}" for student, teacher in self.layer_pairs)


def textbrewer_weights(setting: Setting) -> dict[str, float]:
    """TextBrewer's weights that give hf_distill's gradients (module docstring)."""
    pairs = max(len(setting.layer_pairs), 1)
    return {
        "hard_label_weight": 1.0 - setting.alpha,
        "kd_loss_weight": setting.alpha * setting.temperature**2,
        "match_weight": setting.hidden_weight / pairs,
    }


def torchdistill_alpha(setting: Setting) -> float:
    """torchdistill's KDLoss alpha weights the labels' cross-entropy: 1 - ours."""
    return 1.0 - setting.alpha


def textbrewer_offset(teacher_logits: torch.Tensor, setting: Setting) -> float:
    """alpha * T^2 * mean entropy of softmax(teacher_logits / T), float64: TextBrewer's loss minus ours."""
    scaled = teacher_logits.double() / setting.temperature
    log_p = torch.log_softmax(scaled, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    return float(setting.alpha * setting.temperature**2 * entropy)


def no_decay(name: str) -> bool:
    """Trainer's rule for BERT-family models: no weight decay on biases and LayerNorm weights."""
    return "bias" in name or "LayerNorm" in name or "layernorm" in name


def set_projections(linears: list[nn.Linear], seed: int) -> None:
    """The same initial projection weights in every toolkit (nn.Linear's default range, a seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in linears:
            bound = 1.0 / math.sqrt(linear.in_features)
            linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound - bound)
            linear.bias.copy_(torch.rand(linear.bias.shape, generator=generator) * 2 * bound - bound)


class Probe:
    """Instrumentation, the same for every toolkit: before the teacher's first forward the global RNG is seeded
    (so the student's first dropout masks are the same whichever loop runs it), that forward's logits are kept
    (for the TextBrewer conversion), and step ends are timed."""

    def __init__(self, teacher: nn.Module, seed: int):
        self.seed, self.first_teacher_logits, self.first_loss = seed, None, None
        self.step_ends: list[float] = []
        self.step_faults: list[int] = []  # minor page faults of the process so far, at each step end
        self._handles = [
            teacher.register_forward_pre_hook(self._before_teacher),
            teacher.register_forward_hook(self._after_teacher),
        ]

    def _before_teacher(self, module: nn.Module, inputs: Any) -> None:
        if self.first_teacher_logits is None:
            torch.manual_seed(self.seed)

    def _after_teacher(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        if self.first_teacher_logits is None:
            self.first_teacher_logits = outputs.logits.detach().clone()

    def step_end(self, *_: Any, **__: Any) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def record_loss(self, loss: torch.Tensor) -> None:
        if self.first_loss is None:
            self.first_loss = float(loss.detach())

    def wrap_loss(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            self.record_loss(result[0] if isinstance(result, tuple) else result)
            return result

        return wrapped

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def user_code_lines(function: Callable[..., Any], skip_marked: bool = False) -> int:
    """Lines of a function's body, without its docstring, comments and blank lines; `skip_marked` also leaves out
    the lines marked `# bench-only` (settings only the benchmark needs: fixed batch order, no logging, ...)."""
    source = textwrap.dedent(inspect.getsource(function))
    body = ast.parse(source).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    numbers: set[int] = set()
    for statement in body:
        for node in ast.walk(statement):
            if hasattr(node, "lineno"):
                numbers.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines = [source.splitlines()[number - 1].strip() for number in sorted(numbers)]
    lines = [line for line in lines if line and not line.startswith("#")]
    if skip_marked:
        lines = [line for line in lines if not line.endswith("# bench-only")]
    return len(lines)


# -------------------------------------------------------------------------------------------------------------
# The user code of each toolkit (counted by bench_toolkits.py; nothing in them is instrumentation)
# -------------------------------------------------------------------------------------------------------------


def build_hf_distill(
    teacher, student, train_dataset, tokenizer, setting: Setting, output_dir: str, callbacks=()
):
    """hf_distill: arguments and a trainer; `trainer.train()` runs it."""
    from transformers import DataCollatorWithPadding

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    args = DistillationTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=setting.batch_size,
        max_steps=setting.steps,
        learning_rate=setting.learning_rate,
        warmup_steps=setting.warmup_ratio,
        weight_decay=setting.weight_decay,
        max_grad_norm=setting.max_grad_norm,
        temperature=setting.temperature,
        alpha=setting.alpha,
        hidden_weight=setting.hidden_weight,
        hidden_loss=setting.hidden_loss,
        layer_map=setting.layer_map,
        train_sampling_strategy="sequential",  # bench-only
        seed=setting.seed,
        save_strategy="no",  # bench-only
        report_to="none",  # bench-only
        use_cpu=True,  # bench-only
        disable_tqdm=True,  # bench-only
        logging_steps=10**6,  # bench-only
        dataloader_pin_memory=False,  # bench-only
        log_level="error",  # bench-only
    )
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=list(callbacks),  # bench-only
    )


def build_textbrewer(teacher, student, train_dataset, tokenizer, setting: Setting, output_dir: str):
    """TextBrewer: adaptors, two configs, a distiller, the optimizer, the data loader and the scheduler;
    `with distiller: distiller.train(**train_kwargs)` runs it."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    def adaptor(batch, outputs):
        return {
            "logits": outputs.logits,
            "hidden": outputs.hidden_states,
            "inputs_mask": batch["attention_mask"],
            "losses": outputs.loss,
        }

    weights = textbrewer_weights(setting)
    projection = None
    if setting.student_width != setting.teacher_width:
        projection = ["linear", setting.student_width, setting.teacher_width, {"weight_decay": 0.0}]
    matches = [
        {
            "layer_T": teacher_layer,
            "layer_S": student_layer,
            "feature": "hidden",
            "loss": TEXTBREWER_HIDDEN_LOSS[setting.hidden_loss],
            "weight": weights["match_weight"],
            "proj": list(projection) if projection else None,
        }
        for student_layer, teacher_layer in setting.layer_pairs
    ]
    distill_config = DistillationConfig(
        temperature=setting.temperature,
        hard_label_weight=weights["hard_label_weight"],
        kd_loss_type="ce",
        kd_loss_weight=weights["kd_loss_weight"],
        intermediate_matches=matches if setting.hidden_weight > 0 else None,
    )
    train_config = TrainingConfig(device="cpu", output_dir=output_dir, ckpt_steps=setting.steps)
    distiller = GeneralDistiller(train_config, distill_config, teacher, student, adaptor, adaptor)
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for name, p in named if not no_decay(name)], "weight_decay": setting.weight_decay},
            {"params": [p for name, p in named if no_decay(name)], "weight_decay": 0.0},
        ],
        lr=setting.learning_rate,
        fused=True,
    )
    collator = DataCollatorWithPadding(tokenizer)
    loader = DataLoader(
        train_dataset,
        batch_size=setting.batch_size,
        shuffle=False,  # bench-only
        collate_fn=lambda rows: dict(collator(rows)),  # the distiller tests `type(batch) is dict`
    )
    train_kwargs = dict(
        optimizer=optimizer,
        dataloader=loader,
        num_epochs=1,
        num_steps=setting.steps,
        scheduler_class=get_linear_schedule_with_warmup,
        scheduler_args={"num_warmup_steps": setting.warmup_steps, "num_training_steps": setting.steps},
        max_grad_norm=setting.max_grad_norm,
        output_hidden_states=True,  # passed on to both models' forward
    )
    return distiller, train_kwargs
