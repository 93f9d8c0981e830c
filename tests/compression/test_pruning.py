"""Structured pruning: importance scores against a float64 reference, exact slicing invariants, real models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill.compression.pruning.importance import Importance, measure_importance
from hf_distill.compression.pruning.structured import PruningSpec, check_pruning, prune_model, pruned_config

VOCAB = 100


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Distinct random values everywhere (BERT initialises biases to 0), so slices can be traced back."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            is_norm_weight = "norm" in name.lower() and name.endswith("weight")
            parameter.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.2 * noise)
    return model.eval()


BERT_SETTINGS = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    num_hidden_layers=3,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    num_labels=3,
)


def _bert_config(**overrides) -> BertConfig:
    return BertConfig(**{**BERT_SETTINGS, **overrides})


def _llama_config(config_class=LlamaConfig, **overrides):
    settings = dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        num_hidden_layers=3,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return config_class(**{**settings, **overrides})


def _bert(model_class=BertForSequenceClassification, **overrides):
    torch.manual_seed(0)
    return _randomize(model_class(_bert_config(**overrides)))


def _llama(model_class=LlamaForCausalLM, config_class=LlamaConfig, **overrides):
    torch.manual_seed(0)
    return _randomize(model_class(_llama_config(config_class, **overrides)))


def _batch(seed: int = 1, batch: int = 2, length: int = 7, padded: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[-1, length - 3 :] = 0  # right padding on the last row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _outputs(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return (out.logits, *out.hidden_states)


def _our_hooks(model: torch.nn.Module) -> list:
    """Hooks registered by hf_distill (transformers installs its own output-capturing hooks)."""
    return [
        hook
        for module in model.modules()
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
        if hook.__module__.startswith("hf_distill")
    ]


def _positions(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Index in `old` (1-D, distinct values) of each value of `new`."""
    return [int((old == value).nonzero()[0, 0]) for value in new]


def _top_sorted(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores, descending=True, stable=True)[:count].tolist())


def _bert_reference_scores(model: BertForSequenceClassification, input_ids: torch.Tensor) -> Importance:
    """Minitron scores computed in float64 by calling the layers' submodules directly (no hooks)."""
    model = copy.deepcopy(model).double()
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    head_scores, neuron_scores, layer_scores = [], [], []
    with torch.no_grad():
        hidden = model.bert(input_ids, output_hidden_states=True).hidden_states
        channels = hidden[0].abs().mean(dim=(0, 1))  # embedding LayerNorm output
        for index, layer in enumerate(model.bert.encoder.layer):
            context = layer.attention.self(hidden[index])[0]  # (batch, seq, heads * head_dim)
            attention_output = layer.attention.output(context, hidden[index])  # LayerNorm output
            intermediate = layer.intermediate(attention_output)
            torch.testing.assert_close(layer.output(intermediate, attention_output), hidden[index + 1])
            norms = context.reshape(*context.shape[:2], heads, head_dim).norm(dim=-1)
            head_scores.append(norms.mean(dim=(0, 1)))
            neuron_scores.append(intermediate.abs().mean(dim=(0, 1)))
            channels = (
                channels + attention_output.abs().mean(dim=(0, 1)) + hidden[index + 1].abs().mean((0, 1))
            )
            cosine = torch.nn.functional.cosine_similarity(hidden[index], hidden[index + 1], dim=-1)
            layer_scores.append((1 - cosine).mean())
    return Importance(head_scores, neuron_scores, channels, torch.stack(layer_scores))


# --- ratio 0 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: _bert(),
        lambda: _llama(),
        lambda: _llama(Qwen2ForCausalLM, Qwen2Config),
        lambda: _randomize(RobertaForSequenceClassification(RobertaConfig(**BERT_SETTINGS))),
    ],
    ids=["bert-classifier", "llama-causal-lm", "qwen2-causal-lm", "roberta-classifier"],
)
def test_ratio_zero_returns_an_identical_new_model(build):
    model = build()
    batch = _batch()
    before = copy.deepcopy(model.state_dict())
    pruned = prune_model(model, PruningSpec(), measure_importance(model, [batch]))
    assert pruned is not model
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(pruned.parameters(), model.parameters()))
    for got, want in zip(_outputs(pruned, batch), _outputs(model, batch)):
        assert torch.equal(got, want)
    # the input is untouched and carries no hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not _our_hooks(model) and not _our_hooks(pruned)


# --- importance ---------------------------------------------------------------------------------------


def test_bert_importance_matches_float64_reference_and_pruning_keeps_the_top_units():
    model = _bert()
    input_ids = _batch(padded=False)["input_ids"]
    reference = _bert_reference_scores(model, input_ids)
    importance = measure_importance(model, [{"input_ids": input_ids, "labels": torch.zeros(2).long()}])
    for got, want in zip(importance.heads + importance.neurons, reference.heads + reference.neurons):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(importance.channels.double(), reference.channels, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(importance.layers.double(), reference.layers, rtol=1e-4, atol=1e-7)

    # hidden 16 -> 2 of 4 heads (head size 8 stays), half the neurons, 16 of 32 channels
    pruned = prune_model(model, PruningSpec(hidden=16, ffn=0.5), importance)
    assert (pruned.config.hidden_size, pruned.config.num_attention_heads) == (16, 2)
    embeddings, old_embeddings = pruned.bert.embeddings.word_embeddings.weight, model.bert.embeddings
    kept_channels = [
        next(c for c in range(32) if torch.equal(old_embeddings.word_embeddings.weight[:, c], column))
        for column in embeddings.T
    ]
    assert kept_channels == _top_sorted(reference.channels, 16)
    for index, (new, old) in enumerate(zip(pruned.bert.encoder.layer, model.bert.encoder.layer)):
        rows = _positions(new.attention.self.query.bias, old.attention.self.query.bias)
        assert [row // 8 for row in rows[::8]] == _top_sorted(reference.heads[index], 2)
        neurons = _positions(new.intermediate.dense.bias, old.intermediate.dense.bias)
        assert neurons == _top_sorted(reference.neurons[index], 32)


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_padding_does_not_count(build):
    model = build()
    generator = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, VOCAB, (1, 7), generator=generator), torch.randint(1, VOCAB, (1, 4))
    garbage = torch.randint(1, VOCAB, (1, 3), generator=generator)
    padded = {
        "input_ids": torch.cat([long, torch.cat([short, garbage], dim=1)]),
        "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
    }
    separate = measure_importance(model, [{"input_ids": long}, {"input_ids": short}])
    together = measure_importance(model, [padded, _batch(seed=9)], max_batches=1)  # 2nd batch unused
    for got, want in zip(together.heads + together.neurons, separate.heads + separate.neurons):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.channels, separate.channels, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together.layers, separate.layers, rtol=1e-3, atol=1e-6)


def test_llama_scores_scale_with_the_activation_they_measure():
    """Scaling the value rows of a KV head scales its query heads' context norms; scaling an up_proj row
    scales act(gate) * up. Done in the last layer, so the layers before it see the same inputs."""
    model, batch = _llama(), _batch()
    base = measure_importance(model, [batch])
    neurons_scaled = copy.deepcopy(model)
    with torch.no_grad():
        neurons_scaled.model.layers[-1].mlp.up_proj.weight[5] *= 3.0
        model.model.layers[-1].self_attn.v_proj.weight[8:16] *= 3.0  # KV head 1 -> query heads 2, 3
    heads_scaled = measure_importance(model, [batch])
    torch.testing.assert_close(heads_scaled.heads[-1], base.heads[-1] * torch.tensor([1.0, 1.0, 3.0, 3.0]))
    for got, want in zip(heads_scaled.heads[:-1], base.heads[:-1]):
        torch.testing.assert_close(got, want)

    scaled = measure_importance(neurons_scaled, [batch])
    expected = base.neurons[-1].clone()
    expected[5] *= 3.0
    torch.testing.assert_close(scaled.neurons[-1], expected)
    for got, want in zip(scaled.heads + scaled.neurons[:-1], base.heads + base.neurons[:-1]):
        torch.testing.assert_close(got, want)


def test_llama_silent_units_are_pruned_first():
    """Zero value rows of KV group 0, gate rows of some neurons, and the norm weights of two channels:
    their activations are exactly 0, so they score lowest and go first."""
    model = _llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[:8] = 0.0
            layer.mlp.gate_proj.weight[[1, 4, 9]] = 0.0  # silu(0) * up = 0
            layer.input_layernorm.weight[[3, 7]] = 0.0
            layer.post_attention_layernorm.weight[[3, 7]] = 0.0
        model.model.norm.weight[[3, 7]] = 0.0
    importance = measure_importance(model, [_batch()])
    assert all(h[:2].eq(0).all() and h[2:].gt(0).all() for h in importance.heads)
    pruned = prune_model(model, PruningSpec(heads=0.5, ffn=3 / 64, hidden=30), importance)
    kept_channels = [c for c in range(32) if c not in (3, 7)]
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept_channels])
    for new, old in zip(pruned.model.layers, model.model.layers):
        assert torch.equal(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight[8:16, kept_channels])
        assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[kept_channels, 16:32])
        kept_neurons = [n for n in range(64) if n not in (1, 4, 9)]
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[kept_channels][:, kept_neurons])


# --- exact slicing invariants ---------------------------------------------------------------------------


def _importance_with_silent(model, heads=(), neurons=()) -> Importance:
    """Scores that rank the listed heads / neurons lowest in every layer."""
    config, layers = model.config, model.config.num_hidden_layers
    head_scores, neuron_scores = torch.ones(config.num_attention_heads), torch.ones(config.intermediate_size)
    head_scores[list(heads)], neuron_scores[list(neurons)] = 0.0, 0.0
    return Importance([head_scores] * layers, [neuron_scores] * layers, torch.ones(config.hidden_size))


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_pruning_neurons_with_zero_output_weights_is_exact(build):
    model, batch = build(), _batch()
    silent = [0, 5, 17, 40, 41, 63, 2, 30]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("output.dense.weight", "mlp.down_proj.weight")) and "attention" not in name:
                parameter[:, silent] = 0.0
    pruned = prune_model(model, PruningSpec(ffn=0.125), _importance_with_silent(model, neurons=silent))
    assert pruned.config.intermediate_size == 56
    for got, want in zip(_outputs(pruned, batch), _outputs(model, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _llama(),
        lambda: _llama(Qwen2ForCausalLM, Qwen2Config),
        lambda: _llama(MistralForCausalLM, MistralConfig),
        lambda: _llama(num_key_value_heads=4),
    ],
    ids=["llama-gqa", "qwen2-gqa-with-bias", "mistral-gqa", "llama-mha"],
)
def test_pruning_heads_with_zero_output_projection_is_exact(build):
    model, batch = build(), _batch()
    silent_heads = [0, 1]  # KV group 0 of the GQA models; two heads of the MHA one
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :16] = 0.0
    pruned = prune_model(model, PruningSpec(heads=0.5), _importance_with_silent(model, heads=silent_heads))
    kv_heads = model.config.num_key_value_heads
    assert pruned.config.num_attention_heads == 2
    assert pruned.config.num_key_value_heads == kv_heads // 2
    for got, want in zip(_outputs(pruned, batch), _outputs(model, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_layer_indices_select_layers_and_their_scores():
    model = _llama()
    importance = _importance_with_silent(model, neurons=range(32))  # layers 0, 2: neurons 0..31 lowest
    importance.neurons[1] = torch.arange(64, dtype=torch.float32).flip(0)  # layer 1: neurons 32..63 lowest
    pruned = prune_model(model, PruningSpec(ffn=0.5, layer_indices=[1]), importance)
    assert pruned.config.num_hidden_layers == 1
    new, old = pruned.model.layers[0].mlp, model.model.layers[1].mlp
    assert torch.equal(new.up_proj.weight, old.up_proj.weight[:32])
    uniform = prune_model(model, PruningSpec(layers=2), None)
    assert torch.equal(uniform.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)


# --- real models: save/load, shapes, parameter count, training --------------------------------------------


@pytest.mark.parametrize(
    "build, spec, auto_class",
    [
        (lambda: _bert(), PruningSpec(hidden=16, ffn=0.25, layers=2), AutoModelForSequenceClassification),
        (lambda: _bert(BertForMaskedLM), PruningSpec(hidden=24, heads=0.25, ffn=0.5), AutoModelForMaskedLM),
        (
            lambda: _llama(tie_word_embeddings=True),
            PruningSpec(hidden=20, heads=0.5, ffn=0.25, layers=2),
            AutoModelForCausalLM,
        ),
        (
            lambda: _llama(Qwen3ForCausalLM, Qwen3Config),  # per-head q/k norms stay whole
            PruningSpec(hidden=24, heads=0.5, ffn=0.5),
            AutoModelForCausalLM,
        ),
        (
            lambda: _llama(LlamaForSequenceClassification, tie_word_embeddings=False),
            PruningSpec(hidden=24, ffn=0.5),
            AutoModelForSequenceClassification,
        ),
    ],
    ids=["bert-classifier", "bert-mlm-tied", "llama-causal-tied", "qwen3-causal", "llama-classifier"],
)
def test_pruned_model_is_an_ordinary_model(tmp_path, build, spec, auto_class):
    model, batch = build(), _batch()
    pruned = prune_model(model, spec, measure_importance(model, [batch]))
    config = pruned.config
    fresh = type(pruned)(copy.deepcopy(config))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in pruned.state_dict().items()
    }
    assert pruned.num_parameters() == fresh.num_parameters()
    if config.tie_word_embeddings and pruned.get_output_embeddings() is not None:
        assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    # The config a pipeline checks later stages against, read without weights, is the one the model gets.
    expected = {key: value for key, value in config.to_dict().items() if key != "dtype"}
    assert {
        key: value for key, value in pruned_config(model.config, spec).to_dict().items() if key != "dtype"
    } == (expected)
    pruned.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    for got, want in zip(_outputs(reloaded, batch), _outputs(pruned, batch)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_parameter_count_matches_the_formula():
    llama = _llama(tie_word_embeddings=True)
    pruned = prune_model(
        llama, PruningSpec(hidden=20, heads=0.5, ffn=0.25, layers=2), measure_importance(llama, [_batch()])
    )
    hidden, heads, kv_heads, head_dim, neurons, layers = 20, 2, 1, 8, 48, 2
    per_layer = (
        2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * neurons + 2 * hidden
    )
    assert pruned.num_parameters() == VOCAB * hidden + layers * per_layer + hidden

    bert = _bert()
    pruned = prune_model(bert, PruningSpec(hidden=16, ffn=0.5), measure_importance(bert, [_batch()]))
    hidden, neurons, layers, labels = 16, 32, 3, 3
    embeddings = (VOCAB + 64 + 2) * hidden + 2 * hidden
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * neurons + neurons + hidden + 4 * hidden
    head = hidden * hidden + hidden + labels * hidden + labels
    assert pruned.num_parameters() == embeddings + layers * per_layer + head


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_hidden_pruned_model_trains(build):
    model, batch = build(), _batch()
    pruned = prune_model(model, PruningSpec(hidden=16, ffn=0.5), measure_importance(model, [batch]))
    pruned.train()
    labels = torch.tensor([0, 2]) if isinstance(pruned, BertForSequenceClassification) else batch["input_ids"]
    optimizer = torch.optim.AdamW(pruned.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in pruned.parameters()]
    loss = pruned(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())
    optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(pruned.parameters(), before))


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(heads=1.0), r"heads=1.0 is invalid.*\[0, 1\)"),
        (dict(ffn=-0.1), r"ffn=-0.1 is invalid"),
        (dict(hidden=0), r"hidden=0 is invalid.*positive integer"),
        (dict(layers=0), r"layers=0 is invalid"),
        (dict(layer_indices=[]), r"layer_indices=\[\] is invalid"),
    ],
)
def test_spec_rejects_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        PruningSpec(**fields)


BERT, LLAMA = _bert_config(), _llama_config()


@pytest.mark.parametrize(
    "config, fields, match",
    [
        (BERT, dict(heads=0.5), r"heads=0.5 with hidden unchanged.*set hidden: 16 together with heads: 0.5"),
        (BERT, dict(heads=0.5, hidden=24), r"keeps 2 heads.*set hidden: 16 together with heads: 0.5"),
        (BERT, dict(hidden=20), r"hidden=20 is not a multiple of the head size 8.*hidden: 16 or 24"),
        (BERT, dict(hidden=4), r"hidden=4 is not a multiple.*use hidden: 8"),
        (BERT, dict(heads=0.9, hidden=8), r"heads=0.9 would remove all 4 attention heads"),
        (BERT, dict(hidden=64), r"hidden=64 is larger than the model's hidden_size 32"),
        (LLAMA, dict(hidden=33), r"hidden=33 is larger"),
        (BERT, dict(ffn=0.999), r"ffn=0.999 would remove all 64 FFN neurons.*at most ffn=0.9844"),
        (BERT, dict(ffn=0.001), r"ffn=0.001 removes 0.064 of 64 FFN neurons, which rounds to none"),
        (LLAMA, dict(heads=0.75), r"heads=0.75 would remove all 2 key/value groups.*at most heads=0.5"),
        (LLAMA, dict(heads=0.2), r"heads=0.2 removes 0.4 of 2 key/value groups.*rounds to none.*heads=0.5"),
        (LLAMA, dict(layers=4), r"layers=4 is invalid: the teacher has 3 hidden layers.*from 1 to 3"),
        (LLAMA, dict(layer_indices=[0, 3]), r"layer_indices contains 3.*integers in \[0, 2\]"),
        (LLAMA, dict(layer_indices=[1, 1]), r"layer_indices=\[1, 1\] repeats \[1\]"),
        (LLAMA, dict(layers=2, layer_indices=[1]), r"pass layers=1 or leave it as None"),
        (GPT2Config(), dict(), r"does not support model_type='gpt2'.*bert, roberta, llama"),
        (_bert_config(is_decoder=True, add_cross_attention=True), dict(), r"cross-attention"),
    ],
)
def test_check_pruning_errors(config, fields, match):
    with pytest.raises(ValueError, match=match):
        check_pruning(config, PruningSpec(**fields))


def test_prune_model_validates_before_any_work():
    model = _llama()
    with pytest.raises(ValueError, match="no calibration tokens"):
        measure_importance(model, [])
    with pytest.raises(ValueError, match="max_batches=0 is invalid"):
        measure_importance(model, [_batch()], max_batches=0)
    with pytest.raises(ValueError, match="would remove all 2 key/value groups"):
        prune_model(model, PruningSpec(heads=0.75), None)  # the spec error, not the missing importance
    with pytest.raises(ValueError, match=r"importance is None; pass importance=measure_importance"):
        prune_model(model, PruningSpec(ffn=0.5), None)
    with pytest.raises(ValueError, match=r"neurons must be 3 tensors of shape \(64,\)"):
        prune_model(model, PruningSpec(ffn=0.5), _importance_with_silent(_bert(intermediate_size=32)))
    rounded = prune_model(model, PruningSpec(heads=0.3), _importance_with_silent(model))  # 0.6 -> 1 group
    assert (rounded.config.num_attention_heads, rounded.config.num_key_value_heads) == (2, 1)


# --- every accepted spec saves and reloads ------------------------------------------------------------------

# 8 query heads in 4 key/value groups of head_dim 8 at hidden 64: removing one group keeps 6 heads, which Llama's
# config class refuses next to hidden 64 (it checks hidden_size % num_attention_heads although head_dim is explicit)
# while Mistral's and Qwen's accept it.
GQA_SETTINGS = dict(
    vocab_size=40, hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
    intermediate_size=32, num_hidden_layers=3, max_position_embeddings=32,
)  # fmt: skip
DECODERS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
SPEC_GRID = [
    PruningSpec(heads=heads, hidden=hidden, ffn=0.5, layers=layers)
    for heads in (0.0, 0.25, 0.5, 0.75)
    for hidden in (None, 60, 40)  # 60: 6 heads divide it, 8 do not; 40: 8 divide it, 6 do not
    for layers in (None, 2)
]


_SHAPE_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "num_hidden_layers",
)  # fmt: skip


def _transformers_accepts(config_class, config) -> bool:
    """The independent reference: does the config class itself accept these dimensions (as a fresh config)?"""
    shape = {key: getattr(config, key) for key in _SHAPE_KEYS}
    try:
        config_class(**{**GQA_SETTINGS, **shape})
    except Exception:  # noqa: BLE001 - transformers raises several kinds (strict dataclass validation errors)
        return False
    return True


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_spec_check_pruning_accepts_prunes_saves_and_reloads(tmp_path, name):
    """check_pruning accepts a spec exactly when the pruned model saves and reloads: every accepted spec is pruned,
    saved with save_pretrained and reloaded with AutoModelForCausalLM, computing what it computed in memory; every
    refused one is refused because transformers' config class refuses its dimensions (or for a reason that
    applies to every family alike), so nothing fails after the work."""
    config_class, model_class = DECODERS[name]
    model = _randomize(model_class(config_class(**GQA_SETTINGS)))
    batch = {"input_ids": torch.randint(1, 40, (2, 5), generator=torch.Generator().manual_seed(0))}
    importance = measure_importance(model, [batch])
    accepted = 0
    for spec in SPEC_GRID:
        try:
            check_pruning(model.config, spec)
        except ValueError as error:
            assert "refuses to save or load" in str(error), (spec, error)
            forced = copy.deepcopy(model.config)
            groups = 4 - round(spec.heads * 4)
            forced.hidden_size, forced.num_attention_heads = spec.hidden or 64, groups * 2
            forced.num_key_value_heads = groups
            assert not _transformers_accepts(config_class, forced), spec
            continue
        accepted += 1
        pruned = prune_model(model, spec, importance)
        folder = tmp_path / f"{spec.heads}-{spec.hidden}-{spec.layers}"
        pruned.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(reloaded) is type(pruned)
        torch.testing.assert_close(
            _outputs(reloaded, batch)[0], _outputs(pruned, batch)[0], rtol=0, atol=1e-6
        )
        assert _transformers_accepts(config_class, pruned.config)
    assert accepted >= len(SPEC_GRID) // 2


def test_heads_that_llama_cannot_save_are_refused_naming_valid_counts():
    config = LlamaConfig(**GQA_SETTINGS)
    with pytest.raises(ValueError) as refused:
        check_pruning(config, PruningSpec(heads=0.25))
    message = str(refused.value)
    assert "hidden_size 64 and 6 attention heads" in message
    # The valid head counts at this width (4 divides 64, 2 divides 64; 8 is unpruned) and the nearest width for 6.
    assert "heads: 0.5 (4 heads)" in message and "heads: 0.75 (2 heads)" in message
    assert "hidden: 60" in message  # 60 = 10 x 6, the nearest width below 64 that 6 heads divide
    for fix in (PruningSpec(heads=0.5), PruningSpec(heads=0.75), PruningSpec(heads=0.25, hidden=60)):
        check_pruning(config, fix)
    with pytest.raises(ValueError, match="refuses to save or load"):
        pruned_config(config, PruningSpec(heads=0.25))
    # Mistral keeps the same shape: its config class accepts it.
    assert pruned_config(MistralConfig(**GQA_SETTINGS), PruningSpec(heads=0.25)).num_attention_heads == 6


def test_pruned_config_slices_per_layer_lists_like_the_pruned_model():
    """Qwen2 keeps one entry per layer in layer_types; the config read without weights must match the model's."""
    layer_types = ["full_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(**GQA_SETTINGS, layer_types=layer_types, use_sliding_window=True)
    model = _randomize(Qwen2ForCausalLM(config))
    spec = PruningSpec(layer_indices=[0, 1])
    pruned = prune_model(model, spec)
    expected = {k: v for k, v in pruned.config.to_dict().items() if k != "dtype"}
    assert {k: v for k, v in pruned_config(model.config, spec).to_dict().items() if k != "dtype"} == expected
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
