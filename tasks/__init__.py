"""The task recipes, installed as `hf_distill.tasks`: one folder per task, holding its data, models, metrics and the
recipe's flow, for the thin entry points in scripts/.

- common/          what every recipe shares: flags, loading, running, raw data, the sequence-KD cache
- classification/  text classification (GLUE or local files): scripts/distill_glue.py, train_teacher.py
- lm/              causal language models: scripts/distill_lm.py, cache_teacher_logits.py
- translation/     encoder-decoder translation: scripts/distill_translation.py
- compression/     the compression pipeline's stages: scripts/compress.py

Imports run one way: scripts -> tasks -> hf_distill. A task imports tasks/common and hf_distill, never another task.
"""
