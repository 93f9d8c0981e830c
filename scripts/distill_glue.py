#!/usr/bin/env python
"""Distil a fine-tuned sequence-classification teacher into a smaller student, on GLUE or local files.

    python scripts/distill_glue.py \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 2 \
        --train_file train.csv --validation_file dev.csv --do_train --do_eval \
        --temperature 2 --alpha 0.5 --output_dir outputs/student
    python scripts/distill_glue.py run.yaml          # the same flags, from one YAML or JSON file
    python scripts/distill_glue.py --mutual_learning \
        --peer_base_model_name_or_path bert-base-uncased --peer_num_layers 3 2 \
        --train_file train.csv --validation_file dev.csv --do_train --do_eval --output_dir outputs/peers
    accelerate launch scripts/distill_glue.py run.yaml

Flags: the model flags of tasks/common.py (ModelArguments; --teacher_model_name_or_path takes one teacher or
several, `a b c`, mixed with --teacher_weights, or trained from a cache of them with --teacher_logits_cache DIR
built by scripts/cache_teacher_logits.py --task classification; or --mutual_learning with --peer_model_name_or_path /
--peer_num_layers, no teacher: tasks/mutual_recipe.py), the data flags of tasks/classification.py
(DataArguments, as in transformers' run_glue.py), the unlabelled-data flags of tasks/transfer.py (--transfer_file,
--transfer_split, --use_unlabelled_rows, --augment_copies, --augment_model_name_or_path, ...), the report flags
(ClassificationReportArguments, e.g. --compare_no_kd) and every DistillationTrainingArguments flag (all of TrainingArguments plus --temperature, --alpha, --kd_loss,
--hidden_weight, --teacher_weights, ...).

Writes into --output_dir: the student with its tokenizer and model card, train/eval/all_results.json,
trainer_state.json, and, after a run with evaluation, distill_report.{json,md,png} comparing teacher and
student (quality retained, size, latency and speed-up at batch 1 and 32). With --mutual_learning: every peer in
peer_<k>/ (peers.json says where each came from) and each peer's metrics (eval_peer<k>_...), no report.
"""

from __future__ import annotations

from typing import Any

from hf_distill.tasks import common
from hf_distill.tasks.classification import distill as recipe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe.run(argv, description=__doc__)


if __name__ == "__main__":
    main()
    common.finish_processes()
