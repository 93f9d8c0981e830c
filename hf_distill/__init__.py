"""hf_distill: knowledge distillation for Hugging Face transformers."""

from .args import DistillationTrainingArguments, Seq2SeqDistillationTrainingArguments
from .cross_tokenizer import CrossTokenizerCollator
from .mutual import MutualLearningTrainer
from .student import create_student
from .trainer import DistillationTrainer, Seq2SeqDistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "CrossTokenizerCollator",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "MutualLearningTrainer",
    "Seq2SeqDistillationTrainer",
    "Seq2SeqDistillationTrainingArguments",
    "create_student",
]
