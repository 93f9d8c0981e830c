"""Pure distillation losses: tensors in, a float32 scalar out.

Every function here is stateless. Inputs may be float16/bfloat16/float32; everything is upcast to float32 before
any arithmetic, and the teacher side is always treated as a constant (no gradient reaches it). Masks are explicit
bool tensors over the position dims, True = the position counts.

Reductions: `"mean"` averages over unmasked positions (0.0 with a zero gradient when there are none) and `"sum"`
adds them up, for callers that divide by the Trainer's `num_items_in_batch` themselves.

Memory: `logit_distillation_loss(..., chunk_size=N)` and `fused_linear_distillation_loss` run as custom autograd
Functions that visit N positions at a time and compute the gradient during the forward pass, so only one chunk of
(N, vocab) float32 intermediates exists at once; the fused variant also never forms the full logits.

Layout, one idea per module:
    dense.py     logit_distillation_loss (plain autograd; chunk_size=N dispatches to chunked.py) and
                 bernoulli_distillation_loss (multi-label heads)
    chunked.py   the chunked logit loss's autograd Function
    fused.py     fused_linear_distillation_loss: hidden states + LM heads, never the full logits
    mixture.py   logprob_distillation_loss (a teacher given by log-probabilities) and teacher_mixture_logprobs
                 (the weighted mixture of several teachers)
    sparse.py    sparse_distillation_loss and sparse_distillation_and_cross_entropy (cached teacher top-k)
    features.py  hidden_state_loss and attention_distillation_loss
    incremental.py  lwf_distillation_loss: Learning without Forgetting, the previous model on the old classes
    embeddings.py  embedding_distillation_loss: pooled sentence embeddings (MSE, cosine, in-batch similarities)
    cross_tokenizer.py  cross_tokenizer_distillation_loss: teacher and student with different vocabularies
    _inplace.py  the in-place per-chunk divergence and gradient shared by chunked.py and fused.py
    _common.py   valid kinds, argument checks, mask flattening, reductions, the JSD mixture
"""

from __future__ import annotations

from hf_distill.losses._common import DIVERGENCE_KINDS, LOGIT_KINDS
from hf_distill.losses.cross_tokenizer import CROSS_TOKENIZER_MODES, cross_tokenizer_distillation_loss
from hf_distill.losses.cross_tokenizer_cached import cached_cross_tokenizer_distillation_loss
from hf_distill.losses.dense import bernoulli_distillation_loss, logit_distillation_loss
from hf_distill.losses.embeddings import EMBEDDING_TERMS, embedding_distillation_loss
from hf_distill.losses.features import attention_distillation_loss, hidden_state_loss
from hf_distill.losses.fused import fused_linear_distillation_loss
from hf_distill.losses.incremental import lwf_distillation_loss
from hf_distill.losses.mixture import logprob_distillation_loss, teacher_mixture_logprobs
from hf_distill.losses.sparse import sparse_distillation_and_cross_entropy, sparse_distillation_loss

__all__ = [
    "CROSS_TOKENIZER_MODES",
    "DIVERGENCE_KINDS",
    "EMBEDDING_TERMS",
    "LOGIT_KINDS",
    "attention_distillation_loss",
    "bernoulli_distillation_loss",
    "cached_cross_tokenizer_distillation_loss",
    "cross_tokenizer_distillation_loss",
    "embedding_distillation_loss",
    "fused_linear_distillation_loss",
    "hidden_state_loss",
    "logit_distillation_loss",
    "logprob_distillation_loss",
    "lwf_distillation_loss",
    "sparse_distillation_and_cross_entropy",
    "sparse_distillation_loss",
    "teacher_mixture_logprobs",
]
