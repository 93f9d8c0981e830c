"""The compression demo's `labels_only` stage: the pruned student trained on the labels alone.

It is a distill stage with alpha 0 and no matching terms; these tests check that DistillationTrainer then never runs
the teacher and that its loss and gradients are plain cross-entropy (computed here in float64 from the student's
logits), and that the demo's recipe spells the stage that way, with the budget of the distilled stage it is compared
with.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.compression.recipe import DistillStage, check_recipe, load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "compress" / "bbc_minilm.yaml"


def _bert(seed: int, hidden: int, layers: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def _rows() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for index in range(8):
        length = 4 + index % 5
        rows.append(
            {
                "input_ids": torch.randint(5, 60, (length,), generator=generator).tolist(),
                "attention_mask": [1] * length,
                "labels": index % 3,
            }
        )
    return rows


def test_alpha_zero_never_runs_the_teacher_and_is_plain_cross_entropy(tmp_path):
    teacher = _bert(0, 32, 2).eval()
    student = _bert(1, 16, 2)
    reference = _bert(1, 16, 2)  # the same initial weights
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    rows = _rows()

    class Pad:
        def __call__(self, features):
            width = max(len(f["input_ids"]) for f in features)
            return {
                "input_ids": torch.tensor(
                    [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]
                ),
                "attention_mask": torch.tensor(
                    [f["attention_mask"] + [0] * (width - len(f["attention_mask"])) for f in features]
                ),
                "labels": torch.tensor([f["labels"] for f in features]),
            }

    args = DistillationTrainingArguments(
        output_dir=str(tmp_path),
        alpha=0.0,
        hidden_weight=0.0,
        attention_weight=0.0,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=Pad(),
    )
    batch = Pad()(rows[:4])

    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits.double(), batch["labels"])
    assert abs(loss.item() - expected.item()) < 1e-6
    F.cross_entropy(logits, batch["labels"]).backward()
    for (name, ours), theirs in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)

    student.zero_grad()
    trainer.train()  # two optimizer steps
    assert calls == [], "the teacher ran although nothing uses it"


def test_the_demo_recipe_has_a_labels_only_stage_with_the_distilled_budget():
    recipe = load_recipe(RECIPE)
    check_recipe(recipe)
    stage = recipe.stage("labels_only")
    distilled = recipe.stage("distilled")
    assert isinstance(stage, DistillStage)
    assert stage.source == "pruned" == distilled.source
    assert stage.alpha == 0 and stage.hidden_weight == 0 and stage.attention_weight == 0
    assert stage.epochs == distilled.epochs
    assert (stage.learning_rate, stage.temperature) == (distilled.learning_rate, distilled.temperature)
    assert recipe.final_stage != "labels_only"
