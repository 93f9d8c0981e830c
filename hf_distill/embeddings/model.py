"""`SentenceEmbedder`: a transformers encoder with the sentence-transformers stack over it (pooling, optional Dense
layers, optional normalisation), as one `nn.Module` that `DistillationTrainer` trains as a student or runs as a
teacher (task type `sentence_embedding`).

    encoder (AutoModel) -> token embeddings (batch, seq, hidden)
        -> pool (pooling.py)          (batch, hidden)
        -> dense_layers (Dense...)    (batch, dim)    a teacher's own Dense modules, or a student's projection
        -> L2 normalisation           when the teacher's folder has a Normalize module

`folder.py` loads one from a sentence-transformers folder (or a plain transformers model and a pooling mode) and
saves one as a sentence-transformers folder whose files mirror its teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from hf_distill.embeddings.pooling import check_pooling_mode, pool
from hf_distill.training.teacher import forward_inputs

# Activations a Dense module may name (its config's activation_function), by the paths sentence-transformers writes.
ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": nn.Identity,
    "torch.nn.modules.activation.Tanh": nn.Tanh,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.Sigmoid": nn.Sigmoid,
}
IDENTITY = "torch.nn.modules.linear.Identity"


class DenseLayer(nn.Module):
    """sentence-transformers' Dense module: `activation(linear(x))`; its weights are `linear.weight` and
    `linear.bias` as in that module's files."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, activation: str = IDENTITY):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Dense activation_function {activation!r} is not supported; supported: {sorted(ACTIVATIONS)}."
            )
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(embeddings))

    def config(self) -> dict[str, Any]:
        """The Dense config sentence-transformers reads (2_Dense/config.json)."""
        return {
            "in_features": self.linear.in_features,
            "out_features": self.linear.out_features,
            "bias": self.linear.bias is not None,
            "activation_function": self.activation_name,
        }


@dataclass
class FolderFormat:
    """What a sentence-transformers folder says besides the weights, kept so that a student's folder mirrors its
    teacher's: the Pooling config as written, sentence_bert_config.json and config_sentence_transformers.json."""

    pooling_config: dict[str, Any] = field(default_factory=dict)
    sentence_bert_config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SentenceEmbeddingOutput(ModelOutput):
    """sentence_embedding: (batch, dim); token_embeddings: (batch, seq, hidden), the encoder's last hidden states;
    hidden_states / attentions: the encoder's, when asked for (hidden-state and attention matching)."""

    sentence_embedding: torch.Tensor | None = None
    token_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class SentenceEmbedder(nn.Module):
    """An encoder, a pooling mode, Dense layers and normalisation: one text in, one embedding out.

    Args:
        encoder: a transformers base model (AutoModel) returning `last_hidden_state`.
        pooling: one of `pooling.POOLING_MODES`.
        dense_layers: Dense modules applied after pooling, in order (a teacher's own, or a student's projection).
        projection_dim: with no dense_layers, add one identity-activation Dense from the encoder's width to this
            dimension (the student's projection into its teacher's space); None adds none.
        normalize: L2-normalise the embeddings (sentence-transformers' Normalize module).
        max_seq_length: the tokens per text the folder says (sentence_bert_config.json), or None.
        folder_format: what the folder it came from says besides the weights (see `FolderFormat`).
    """

    distillation_task_type = (
        "sentence_embedding"  # read by DistillationTrainer (training.task_loss.infer_task)
    )
    library_name = "sentence-transformers"  # read by the model card
    pipeline_tag = "sentence-similarity"

    def __init__(
        self,
        encoder: nn.Module,
        pooling: str = "mean",
        *,
        dense_layers: Sequence[DenseLayer] = (),
        projection_dim: int | None = None,
        normalize: bool = False,
        max_seq_length: int | None = None,
        folder_format: FolderFormat | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling = check_pooling_mode(pooling)
        layers = list(dense_layers)
        if projection_dim is not None:
            if layers:
                raise ValueError("pass dense_layers or projection_dim, not both.")
            layers = [DenseLayer(self.hidden_size, int(projection_dim))]
        self.dense_layers = nn.ModuleList(layers)
        self.normalize = bool(normalize)
        self.max_seq_length = max_seq_length
        self.folder_format = folder_format or FolderFormat()

    @property
    def config(self) -> Any:
        """The encoder's config (the model card and the trainer read layers and widths from it)."""
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def embedding_dimension(self) -> int:
        """The dimension of the sentence embeddings this model returns."""
        return self.dense_layers[-1].linear.out_features if len(self.dense_layers) else self.hidden_size

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.encoder.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> SentenceEmbeddingOutput:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = forward_inputs(
            self.encoder, {key: value for key, value in given.items() if value is not None}
        )
        outputs = self.encoder(
            **inputs,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        token_embeddings = outputs.last_hidden_state  # (batch, seq, hidden)
        embedding = pool(token_embeddings, attention_mask, self.pooling)  # (batch, hidden)
        for layer in self.dense_layers:
            embedding = layer(embedding)  # (batch, dim)
        if self.normalize:
            embedding = F.normalize(embedding, p=2, dim=-1)
        return SentenceEmbeddingOutput(
            sentence_embedding=embedding,
            token_embeddings=token_embeddings,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], tokenizer: Any, *, batch_size: int = 32, max_length: int | None = None
    ) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings on the CPU, in eval mode (restored after), batches of texts of
        similar length (sorted by length, as sentence-transformers' encode does, then put back in order).
        max_length: tokens per text (default: the folder's max_seq_length, else the tokenizer's limit)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        limit = max_length or self.max_seq_length
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        try:
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[index] for index in chosen],
                    padding=True,
                    truncation=True,
                    max_length=limit,
                    return_tensors="pt",
                )
                batch = {key: value.to(device) for key, value in batch.items()}
                embeddings = self(**batch).sentence_embedding.float().cpu()
                for position, index in enumerate(chosen):
                    rows[index] = embeddings[position]
        finally:
            self.train(was_training)
        if not rows:
            return torch.empty(0, self.embedding_dimension)
        return torch.stack(rows)
