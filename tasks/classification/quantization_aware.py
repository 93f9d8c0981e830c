"""Quantization-aware distillation for the classification recipe (`--quantization_aware_training`).

The student trains against the full-precision teacher with its Linear layers running as the deployed INT8 model does
(hf_distill.compression.qat: int8 weights in [-64, 64], uint8 inputs with static ranges, uint8 embedding tables). The input ranges
need no calibration data here: each is set by the first training batch and then follows an exponential moving average
of the batches' ranges (--qat_range_momentum). At the end the fake quantization is removed and the float model saved
again; its config.json carries the final ranges (`int8_qat`), so that `quantize_int8` (or scripts/compress.py)
deploys exactly the model that was trained.
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
            "help": "Train the student with fake-quantized INT8 weights and activations, exactly as "
            "hf_distill.compression.quantization.quantize_int8 deploys it, against the float teacher; the saved model is float, "
            "with the trained input ranges in its config.json, ready to quantize."
        },
    )
    qat_per_channel: bool = field(
        default=True,
        metadata={"help": "Per-output-channel weight scales (as quantize_int8(per_channel=True))."},
    )
    qat_activations: bool = field(default=True, metadata={"help": "Also fake-quantize the Linear inputs."})
    qat_range_momentum: float = field(
        default=0.01,
        metadata={
            "help": "Weight of each training batch's [min, max] in the moving average of every Linear input's "
            "static range (0: keep the first batch's)."
        },
    )

    def __post_init__(self):
        if not 0 <= self.qat_range_momentum <= 1:
            raise ValueError(f"--qat_range_momentum must be in [0, 1], got {self.qat_range_momentum}.")


def prepare(student: nn.Module, args: QuantizationAwareArguments) -> nn.Module:
    if not args.quantization_aware_training:
        return student
    from hf_distill.compression.qat import prepare_qat

    logger.info("Quantization-aware training: the student's Linear layers run as the deployed INT8 model.")
    return prepare_qat(
        student,
        per_channel=args.qat_per_channel,
        activations=args.qat_activations,
        range_momentum=args.qat_range_momentum,
    )


def finish(trainer, args: QuantizationAwareArguments) -> None:
    """Remove the fake quantization and save the float model again (over the fake-quantized save); the input ranges it
    trained with go into its config.json (hf_distill.compression.qat.strip_qat)."""
    if not args.quantization_aware_training:
        return
    from hf_distill.compression.qat import activation_ranges, strip_qat

    logger.info(f"QAT: saving {len(activation_ranges(trainer.model))} trained input ranges with the model.")
    strip_qat(trainer.model)
    trainer.save_model()
