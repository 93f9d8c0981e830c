"""Drafts for assisted decoding and the pruning a generation recipe uses, on tiny config-built Llamas.

References: the teacher's own greedy `generate` (assisted decoding must return exactly its tokens); the invariant
that a draft equal to the teacher has every drafted token accepted; the invariant that pruning units whose
output weights are zero, or a block that passes its input through unchanged, leaves the logits unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_lm_tokenizer, make_seq2seq_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, MarianConfig

from hf_distill.compression.assisted import UNIVERSAL, assisted_generate, check_assistable, load_draft
from hf_distill.compression.pruning import Importance, PruningSpec, measure_importance, prune_model
from hf_distill.tasks.compression.lm_stages import kept_by_importance


def _llama(layers=2, hidden=64, seed=0, vocab=None):
    tokenizer = make_lm_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


PROMPT = torch.tensor([[2, 10, 11, 12, 40, 41, 7]])


def test_assisted_decoding_returns_the_teachers_greedy_tokens():
    teacher, _ = _llama(layers=3, seed=0)
    draft, _ = _llama(layers=1, hidden=32, seed=1)  # an unrelated draft: many rejections, same tokens
    expected = teacher.generate(PROMPT, max_new_tokens=20, eos_token_id=[], do_sample=False)[
        :, PROMPT.shape[1] :
    ]
    tokens, counts = assisted_generate(
        teacher, draft, PROMPT, 20, num_assistant_tokens=4, schedule="constant"
    )
    assert torch.equal(tokens, expected)
    assert counts.verifications >= 1 and 0 <= counts.accepted <= counts.drafted
    assert counts.drafted == sum(drafted for drafted, _ in counts.per_call)
    assert "_get_candidate_generator" not in teacher.__dict__


def test_fixed_length_assisted_decoding_goes_on_past_the_end_token():
    """The report's fixed lengths turn the end token off for teacher and draft alike: where the teacher's greedy path
    reaches its end token, assisted decoding still returns every one of the tokens transformers' generate makes with
    no end token, and with it on, the same token ends transformers' own decoding there."""
    teacher, _ = _llama(layers=3, seed=0)
    draft, _ = _llama(layers=1, hidden=32, seed=1)
    free = teacher.generate(PROMPT, max_new_tokens=20, eos_token_id=[], do_sample=False)[0, PROMPT.shape[1] :]
    end = int(free[5])
    first = free.tolist().index(end)
    for model in (teacher, draft):
        model.config.eos_token_id = model.generation_config.eos_token_id = end
    stopped = teacher.generate(PROMPT, max_new_tokens=20, do_sample=False)[0, PROMPT.shape[1] :]
    assert stopped.tolist() == free[: first + 1].tolist()
    tokens, counts = assisted_generate(
        teacher, draft, PROMPT, 20, num_assistant_tokens=3, confidence_threshold=0.0
    )
    assert tokens[0].tolist() == free.tolist() and counts.verifications >= 1
    alone, _ = assisted_generate(teacher, None, PROMPT, 20)
    assert alone[0].tolist() == free.tolist()


def test_a_dynamic_int8_draft_assists_with_the_teachers_tokens_and_leaves_its_folder_float32(tmp_path):
    """load_draft(..., "dynamic_int8") turns every Linear of the draft into PyTorch's dynamically quantized Linear
    (int8 weights) and nothing else; the teacher still checks every token, so assisted decoding returns exactly its
    greedy tokens; the saved folder is not touched."""
    teacher, tokenizer = _llama(layers=3, seed=0)
    draft, _ = _llama(layers=1, hidden=32, seed=1)
    draft.save_pretrained(tmp_path / "draft")
    tokenizer.save_pretrained(tmp_path / "draft")
    saved = (tmp_path / "draft" / "model.safetensors").read_bytes()
    quantized = load_draft(tmp_path / "draft", "dynamic_int8")
    linears = [name for name, module in draft.named_modules() if isinstance(module, torch.nn.Linear)]
    modules = dict(quantized.named_modules())
    assert linears and all(
        isinstance(modules[name], torch.ao.nn.quantized.dynamic.Linear) for name in linears
    )
    assert not any(isinstance(module, torch.nn.Linear) for module in quantized.modules())
    assert modules[linears[0]].weight().dtype == torch.qint8
    expected = teacher.generate(PROMPT, max_new_tokens=20, eos_token_id=[], do_sample=False)[
        :, PROMPT.shape[1] :
    ]
    tokens, counts = assisted_generate(
        teacher, quantized, PROMPT, 20, num_assistant_tokens=4, confidence_threshold=0.0
    )
    assert torch.equal(tokens, expected) and counts.drafted > 0
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == saved
    with pytest.raises(ValueError, match="use dynamic_int8"):
        load_draft(tmp_path / "draft", "int4")


def test_confidence_threshold_zero_always_drafts_the_full_run():
    """transformers stops drafting below its confidence threshold (0.4 by default); at 0 every verification checks
    num_assistant_tokens drafted tokens, or fewer only where the tokens still to make leave no room (the teacher's own
    next token always comes on top), and the tokens stay the teacher's greedy ones."""
    teacher, _ = _llama(layers=3, seed=0)
    draft, _ = _llama(layers=1, hidden=32, seed=1)
    expected, _ = assisted_generate(teacher, None, PROMPT, 20)
    tokens, counts = assisted_generate(
        teacher, draft, PROMPT, 20, num_assistant_tokens=3, schedule="constant", confidence_threshold=0.0
    )
    assert torch.equal(tokens, expected)
    produced = 0
    for drafted, accepted in counts.per_call:
        assert drafted == min(3, 20 - produced - 1), counts.per_call
        produced += accepted + 1
    assert produced == 20
    assert draft.generation_config.assistant_confidence_threshold == 0.0


def test_a_draft_equal_to_the_teacher_is_always_accepted():
    teacher, _ = _llama(layers=2, seed=0)
    tokens, counts = assisted_generate(teacher, copy.deepcopy(teacher), PROMPT, 16, num_assistant_tokens=4)
    assert counts.acceptance_rate == 1.0
    alone, none = assisted_generate(teacher, None, PROMPT, 16)
    assert torch.equal(tokens, alone) and none.drafted == 0


def test_check_assistable_names_what_cannot_assist():
    teacher, tokenizer = _llama()
    assert check_assistable(teacher.config, tokenizer, teacher.config, tokenizer) == "same_tokenizer"
    seq2seq = make_seq2seq_tokenizer()
    marian = MarianConfig(vocab_size=len(seq2seq), d_model=32, encoder_layers=1, decoder_layers=1)
    with pytest.raises(ValueError, match="both be decoder-only or both encoder-decoder"):
        check_assistable(teacher.config, tokenizer, marian, seq2seq)
    with pytest.raises(ValueError, match="same tokenizer"):
        check_assistable(marian, seq2seq, copy.deepcopy(marian), tokenizer)
    # a decoder-only draft with another vocabulary: universal assisted decoding (re-tokenized text)
    assert check_assistable(teacher.config, tokenizer, teacher.config, seq2seq) == UNIVERSAL
    small = copy.deepcopy(teacher.config)
    small.vocab_size = len(tokenizer) - 3
    with pytest.raises(ValueError, match="vocabulary rows"):
        check_assistable(teacher.config, tokenizer, small, tokenizer)


def test_pruning_zeroed_heads_and_neurons_leaves_logits_unchanged():
    model, _ = _llama(layers=2, hidden=64)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :32] = 0  # neurons 0-31 write nothing
            layer.self_attn.o_proj.weight[:, :32] = 0  # query heads 0-1 (head size 16) = key/value group 0
    config = model.config
    zero_first = lambda n, k: torch.cat([torch.zeros(k), torch.ones(n - k)])  # noqa: E731
    importance = Importance(
        heads=[zero_first(config.num_attention_heads, 2) for _ in range(2)],
        neurons=[zero_first(config.intermediate_size, 32) for _ in range(2)],
        channels=torch.ones(config.hidden_size),
    )
    pruned = prune_model(model, PruningSpec(heads=0.5, ffn=0.25), importance).eval()
    assert pruned.config.num_key_value_heads == 1 and pruned.config.intermediate_size == 96
    ids = torch.tensor([[2, 10, 11, 12, 40, 41, 7, 9]])
    torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_depth_pruning_by_block_importance_drops_a_pass_through_block():
    model, _ = _llama(layers=4, hidden=64, seed=3)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity block
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    batches = [{"input_ids": torch.randint(5, 60, (4, 12))} for _ in range(2)]
    importance = measure_importance(model, batches, layers=True)
    kept = kept_by_importance(importance.layers, 3)
    assert kept == [0, 1, 3]
    pruned = prune_model(model, PruningSpec(layer_indices=kept), importance).eval()
    ids = torch.tensor([[2, 10, 11, 12, 40, 41, 7, 9]])
    torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
