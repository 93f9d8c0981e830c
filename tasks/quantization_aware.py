"""Quantization-aware distillation for the classification recipe (`--quantization_aware_training`).

The student trains with fake-quantized weights and activations in the scheme ONNX Runtime's dynamic INT8
deploys (hf_distill.qat) against the full-precision teacher; the fake quantization is removed before the
model is saved, so the folder holds a plain float model whose weights were trained to survive INT8
(export and quantize it with hf_distill.quantization, or let scripts/compress.py do it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class QuantizationAwareArguments:
    quantization_aware_training: bool = field(
        default=False,
        metadata={
            "help": "Train the student with fake-quantized INT8 weights and activations (as ONNX Runtime's "
            "dynamic quantization runs it) against the float teacher; the saved model is float, ready to quantize."
        },
    )
    qat_per_channel: bool = field(
        default=True,
        metadata={"help": "Per-output-channel weight scales (as quantize_int8(per_channel=True))."},
    )
    qat_activations: bool = field(default=True, metadata={"help": "Also fake-quantize the Linear inputs."})


def prepare(student: nn.Module, args: QuantizationAwareArguments) -> nn.Module:
    if not args.quantization_aware_training:
        return student
    from hf_distill.qat import prepare_qat

    logger.info("Quantization-aware training: the student's Linear layers run fake-quantized INT8.")
    return prepare_qat(student, per_channel=args.qat_per_channel, activations=args.qat_activations)


def finish(trainer, args: QuantizationAwareArguments) -> None:
    """Remove the fake quantization and save the float model again (over the fake-quantized save)."""
    if not args.quantization_aware_training:
        return
    from hf_distill.qat import strip_qat

    strip_qat(trainer.model)
    trainer.save_model()
