"""The loss conventions bench_toolkits.py converts, checked against TextBrewer's own code.

TextBrewer's KD term is a soft cross-entropy, -sum p_T log p_S at temperature T averaged over the batch, without
T^2; ours is T^2 * KL(p_T || p_S). With kd_loss_weight = alpha * T^2, hard_label_weight = 1 - alpha and each of the
n hidden-state matches weighted hidden_weight / n, TextBrewer's GeneralDistiller must give our DistillationTrainer's
gradients exactly, and a loss larger by alpha * T^2 * H(p_T), the teacher's mean entropy at T (computed here in
float64). The reference is TextBrewer's installed code (its loss function and its distiller's train_on_batch); the
models are tiny config-built BERTs without dropout, so one forward is deterministic.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

textbrewer = pytest.importorskip("textbrewer", reason="TextBrewer is in the `peers` extra")

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_distill.losses import logit_distillation_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _toolkits  # noqa: E402

TEMPERATURE, ALPHA, HIDDEN_WEIGHT = 2.0, 0.5, 1.0
# torchdistill cannot share the project's environment (its torchvision does not import beside the CPU torch), but its
# loss modules import without torchvision: a separate environment that has it is used where one exists.
TORCHDISTILL_PYTHON = os.environ.get("HF_DISTILL_TORCHDISTILL_PYTHON", "/tmp/td_venv/bin/python")
PAIRS = ((1, 2), (2, 4))  # student layer -> teacher layer, indices into hidden_states


def _bert(hidden: int, layers: int, heads: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    return BertForSequenceClassification(config)


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 50, (4, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # two padded rows: the hidden-state terms must skip their padding
    attention_mask[3, 4:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([0, 2, 1, 2]),
    }


def _teacher_entropy_term(teacher_logits: torch.Tensor) -> float:
    """alpha * T^2 * mean over the batch of H(softmax(z_T / T)), in float64."""
    log_p = torch.log_softmax(teacher_logits.double() / TEMPERATURE, dim=-1)
    return ALPHA * TEMPERATURE**2 * float(-(log_p.exp() * log_p).sum(-1).mean())


def test_textbrewer_kd_ce_is_our_kl_plus_the_teacher_entropy():
    generator = torch.Generator().manual_seed(1)
    student_logits = torch.randn(6, 5, generator=generator)
    teacher_logits = torch.randn(6, 5, generator=generator) * 3
    theirs = textbrewer.losses.kd_ce_loss(student_logits, teacher_logits, TEMPERATURE)
    ours = logit_distillation_loss(student_logits, teacher_logits, temperature=TEMPERATURE)
    entropy = _teacher_entropy_term(teacher_logits) / (ALPHA * TEMPERATURE**2)
    assert float(ours) == pytest.approx(TEMPERATURE**2 * (float(theirs) - entropy), rel=1e-5)


@pytest.mark.parametrize("hidden_loss, textbrewer_loss", [("mse", "hidden_mse"), ("cosine", "cos")])
def test_general_distiller_first_step_matches_distillation_trainer(tmp_path, hidden_loss, textbrewer_loss):
    teacher = _bert(32, 4, 4, seed=0).eval()
    student = _bert(16, 2, 2, seed=1)
    student_theirs = copy.deepcopy(student)
    batch = _batch()

    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "ours"),
        temperature=TEMPERATURE,
        alpha=ALPHA,
        hidden_weight=HIDDEN_WEIGHT,
        hidden_loss=hidden_loss,
        layer_map=",".join(f"{s}:{t}" for s, t in PAIRS),
        use_cpu=True,
        report_to="none",
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    ours = trainer.compute_loss(student, dict(batch))
    ours.backward()

    matches = [
        {
            "layer_T": t,
            "layer_S": s,
            "feature": "hidden",
            "loss": textbrewer_loss,
            "weight": HIDDEN_WEIGHT / len(PAIRS),
            "proj": ["linear", 16, 32],
        }
        for s, t in PAIRS
    ]
    distiller = textbrewer.GeneralDistiller(
        textbrewer.TrainingConfig(device="cpu", output_dir=str(tmp_path / "theirs")),
        textbrewer.DistillationConfig(
            temperature=TEMPERATURE,
            hard_label_weight=1 - ALPHA,
            kd_loss_type="ce",
            kd_loss_weight=ALPHA * TEMPERATURE**2,
            intermediate_matches=matches,
        ),
        teacher,
        student_theirs,
        lambda b, o: {"logits": o.logits, "hidden": o.hidden_states, "inputs_mask": b["attention_mask"]},
        lambda b, o: {
            "logits": o.logits,
            "hidden": o.hidden_states,
            "inputs_mask": b["attention_mask"],
            "losses": o.loss,
        },
    )
    ours_projections = [m for m in trainer.hidden_projections.modules() if isinstance(m, torch.nn.Linear)]
    assert len(ours_projections) == len(distiller.projs) == len(PAIRS)
    for theirs_projection, ours_projection in zip(distiller.projs, ours_projections):
        theirs_projection.load_state_dict(ours_projection.state_dict())
    theirs, _ = distiller.train_on_batch(dict(batch), {"output_hidden_states": True})  # (total, terms)
    theirs.backward()

    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert ours.item() == pytest.approx(
        theirs.item() - _teacher_entropy_term(teacher_logits), rel=1e-5, abs=1e-6
    )
    for (name, ours_parameter), theirs_parameter in zip(
        student.named_parameters(), student_theirs.parameters()
    ):
        if ours_parameter.grad is None:
            assert theirs_parameter.grad is None or not theirs_parameter.grad.any(), name
            continue
        torch.testing.assert_close(theirs_parameter.grad, ours_parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    for theirs_projection, ours_projection in zip(distiller.projs, ours_projections):
        torch.testing.assert_close(
            theirs_projection.weight.grad, ours_projection.weight.grad, rtol=1e-4, atol=1e-6
        )


def test_the_benchmark_uses_the_conversion_checked_here():
    setting = _toolkits.Setting(
        temperature=TEMPERATURE, alpha=ALPHA, hidden_weight=HIDDEN_WEIGHT, layer_pairs=PAIRS
    )
    assert _toolkits.textbrewer_weights(setting) == {
        "hard_label_weight": 1 - ALPHA,
        "kd_loss_weight": ALPHA * TEMPERATURE**2,
        "match_weight": HIDDEN_WEIGHT / len(PAIRS),
    }
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    assert _toolkits.textbrewer_offset(logits, setting) == pytest.approx(
        _teacher_entropy_term(logits), rel=1e-12
    )
    assert _toolkits.torchdistill_alpha(setting) == pytest.approx(1 - ALPHA)


@pytest.mark.skipif(
    not Path(TORCHDISTILL_PYTHON).is_file(), reason=f"no torchdistill environment at {TORCHDISTILL_PYTHON}"
)
def test_torchdistill_kd_loss_with_alpha_flipped_is_ours(tmp_path):
    """torchdistill's KDLoss is alpha * CE + (1 - alpha) * T^2 * KL: with its alpha = 1 - ours it is our loss."""
    generator = torch.Generator().manual_seed(2)
    student_logits = torch.randn(8, 5, generator=generator)
    teacher_logits = torch.randn(8, 5, generator=generator) * 2
    labels = torch.randint(0, 5, (8,), generator=generator)
    torch.save(
        {"student": student_logits, "teacher": teacher_logits, "labels": labels}, tmp_path / "logits.pt"
    )
    script = (
        "import sys, torch\n"
        "from torchdistill.losses.mid_level import KDLoss\n"
        f"loss = KDLoss('s', 'output', 't', 'output', temperature={TEMPERATURE}, alpha={1 - ALPHA})\n"
        "d = torch.load(sys.argv[1])\n"
        "print(float(loss({'s': {'output': d['student']}}, {'t': {'output': d['teacher']}}, d['labels'])))\n"
    )
    completed = subprocess.run(
        [TORCHDISTILL_PYTHON, "-c", script, str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    theirs = float(completed.stdout.strip().splitlines()[-1])
    ours = (1 - ALPHA) * torch.nn.functional.cross_entropy(
        student_logits, labels
    ) + ALPHA * logit_distillation_loss(student_logits, teacher_logits, temperature=TEMPERATURE)
    assert float(ours) == pytest.approx(theirs, rel=1e-5)
