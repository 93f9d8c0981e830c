"""What a run tells its users: how the student compares with the teacher, and its model card.

- report.py      the distillation report: quality retained, parameters, size on disk, latency, speed-up, a plot
- latency.py     timing several models alternately, so a busy machine slows all of them alike
- decoding.py    generation speed: time to first token, prefill and decode tokens/s, peak memory of one generation
- machine.py     the CPU a figure was measured on: model, SIMD flags, the INT8 kernel they select
- cpuid.py       the SIMD flags as CPUID tells this process (what the libraries pick their kernels from)
- model_card.py  the student's README.md: distillation settings, sizes, metrics, Hub metadata
- base_model.py  which model a card names as `base_model` (Hub ids only, never a machine path)

May import storage/ and the standard libraries; trainer.py, compression/ and the recipes call it.
"""
