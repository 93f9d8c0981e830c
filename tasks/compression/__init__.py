"""The compression recipe's stages (scripts/compress.py): fine-tune the teacher, prune, distil, quantize, each into
its own folder, and load any stage back for the report (stages.py, text classifiers).

Generation recipes (`task: causal_lm` / `translation`): generation_flow.py (checks, stages, report), generation_data.py
(splits, tokenizer, prompts), lm_stages.py and translation_stages.py (the stages), generation_measure.py (what the
report measures).

May import tasks/common, tasks/classification, tasks/lm, tasks/translation and hf_distill.
"""
