"""The compression recipe's stages (scripts/compress.py): fine-tune the teacher, prune, distil, quantize, each into
its own folder, and load any stage back for the report (stages.py).

May import tasks/common and hf_distill.
"""
