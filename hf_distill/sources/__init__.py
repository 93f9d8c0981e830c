"""Where the KD term's teacher signal comes from: one small object per place behind one interface
(`base.KDSource`: `model_kwargs`, `kd_sum`, `task_sum`), chosen once when the trainer is built
(`choice.choose_kd_source`), so that the trainer's loss reads as its formula.

- base.py             the interface and `StudentStep`, the micro-batch view every source reads
- logits.py           a live teacher: logits (`LogitsKD`), start/end spans (`SpanKD`), a fused LM head (`FusedLMHeadKD`)
- cached.py           a cache of the teacher's top-k log-probabilities (`CachedTopKKD`)
- ensemble.py         several teachers' mixture (`EnsembleLogitsKD`, `teacher_set`)
- cross_tokenizer.py  a teacher with another tokenizer, live or cached (`CrossTokenizerKD`, `CachedCrossTokenizerKD`)
- embeddings.py       a live teacher's pooled sentence embeddings (`EmbeddingKD`, task type sentence_embedding)
- choice.py           which source a configuration gets

May import training/, caches/, alignment/, losses/ and args.py; trainer.py and mutual.py import it.
"""

from __future__ import annotations

from hf_distill.sources.base import KDSource, StudentStep, head_loss_sum, logits_of
from hf_distill.sources.cached import CachedTopKKD
from hf_distill.sources.choice import choose_kd_source
from hf_distill.sources.cross_tokenizer import CachedCrossTokenizerKD, CrossTokenizerKD
from hf_distill.sources.embeddings import EmbeddingKD
from hf_distill.sources.ensemble import EnsembleLogitsKD, teacher_set
from hf_distill.sources.logits import FusedLMHeadKD, LogitsKD, SpanKD

__all__ = [
    "CachedCrossTokenizerKD",
    "CachedTopKKD",
    "CrossTokenizerKD",
    "EmbeddingKD",
    "EnsembleLogitsKD",
    "FusedLMHeadKD",
    "KDSource",
    "LogitsKD",
    "SpanKD",
    "StudentStep",
    "choose_kd_source",
    "head_loss_sum",
    "logits_of",
    "teacher_set",
]
