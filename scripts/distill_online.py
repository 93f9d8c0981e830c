#!/usr/bin/env python
r"""Online distillation on a stream: chunks of text classification data arrive as files in a folder; every N chunks
the teacher is fine-tuned on the newest labelled rows; on every chunk the student distils from the current teacher;
a checkpoint is written per chunk, and rerunning the same command resumes after the last finished chunk.

    python scripts/distill_online.py \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 2 \
        --stream_dir incoming/ --refresh_every 2 --eval_file test.csv \
        --num_train_epochs 1 --learning_rate 1e-4 --temperature 2 --alpha 0.5 --output_dir outputs/online
    python scripts/distill_online.py online.yaml     # the same flags, from one YAML or JSON file

Chunks are .csv/.tsv/.json/.jsonl/.parquet files with a text column (--text_column_names) and a label column of the
teacher's class names (rows may lack a label: they are distilled on, not used to refresh the teacher), processed in
name order; with --poll_seconds the script waits for chunks that appear later. Before training on a chunk, teacher and
student are evaluated on it (prequential accuracy); with --eval_file also after.

Writes into --output_dir: checkpoints/chunk-NNNNN/ (student/, teacher/ when refreshed there, chunk_state.json), the
final student in student/, and stream_summary.json with every chunk's metrics.
"""

from __future__ import annotations

from typing import Any

from hf_distill.tasks import common
from hf_distill.tasks.online import recipe


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe.run(argv, description=__doc__)


if __name__ == "__main__":
    main()
    common.finish_processes()
