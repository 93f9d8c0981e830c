#!/usr/bin/env python
"""Fine-tune a teacher for sequence classification, for when the model has no trained head yet (a
pretrained encoder such as all-MiniLM-L6-v2). Plain `transformers.Trainer`, same data flags as
distill_glue.py.

    python scripts/train_teacher.py --model_name_or_path <encoder> \
        --train_file train.csv --validation_file dev.csv --do_train --do_eval \
        --num_train_epochs 3 --learning_rate 5e-5 --output_dir outputs/teacher
    python scripts/train_teacher.py teacher.yaml

The fine-tuned model, its tokenizer (with the data's label names in id2label/label2id) and
train/eval/all_results.json are written to --output_dir, ready for --teacher_model_name_or_path.
"""

from __future__ import annotations

from typing import Any

from hf_distill.tasks import common
from hf_distill.tasks.classification import teacher as recipe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe.run(argv, description=__doc__)


if __name__ == "__main__":
    main()
    common.finish_processes()
