"""The deployed generation runtime (CTranslate2) against PyTorch on tiny models built from configs: logits,
log-likelihoods and greedy tokens agree within the stated bounds, a pruned Llama with an explicit head size
converts, a translator's greedy translations agree, and the deployed folder runs with ctranslate2 and tokenizers
alone (no torch, no hf_distill)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_lm_tokenizer, make_seq2seq_tokenizer
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_distill.compression.generation_runtime import (
    CTranslate2CausalLM,
    CTranslate2Translator,
    deployed_size,
    export_ctranslate2,
    load_generation_model,
)
from hf_distill.compression.torch_generation import TorchCausalLM, TorchTranslator  # noqa: E402

ctranslate2 = pytest.importorskip("ctranslate2")

# Bounds, stated once. float32 export: logits within 2e-4 of PyTorch's (different GEMM kernels sum in another
# order; logits here are O(10)), log-likelihoods within 1e-4 relative, and every greedy token equal where the
# PyTorch path's top-1 / top-2 margin exceeds 1e-2 (checked). INT8 weights: at least 75% of greedy positions equal.
LOGIT_ATOL = 2e-4
INT8_AGREEMENT = 0.75
# A translator's float32 greedy tokens against transformers' generate: the first token of every row, and at least
# 95% of all positions (a near-tie may flip one late token and the row's tail with it).
TRANSLATOR_AGREEMENT = 0.95


def _llama(tmp_path, name="llama", heads=4, kv_heads=2, head_dim=16, hidden=64, seed=0):
    tokenizer = make_lm_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a peaked output layer: greedy choices with clear margins, as a trained model has
        model.lm_head.weight.mul_(30.0)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def _prompts(tokenizer, count=8, length=6, seed=0):
    rng = np.random.default_rng(seed)
    low = len(tokenizer.all_special_tokens)
    return [rng.integers(low, len(tokenizer), size=length).tolist() for _ in range(count)]


def _greedy_margin(model, prompts, new_tokens):
    """The smallest top-1 minus top-2 logit along PyTorch's greedy paths (float64 check of how clear each choice is)."""
    out = model.generate(torch.tensor(prompts), max_new_tokens=new_tokens, eos_token_id=[],
                         do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    logits = torch.stack(out.logits, 1).double()  # (batch, new, vocab)
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def test_float32_export_matches_pytorch_logits_likelihood_and_tokens(tmp_path):
    model, tokenizer, folder = _llama(tmp_path)
    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="float32")
    runtime = CTranslate2CausalLM(deployed, num_threads=1)
    prompts = _prompts(tokenizer)
    # logits of every position, read with ctranslate2's own forward_batch
    ids = torch.tensor(prompts)
    expected = model(input_ids=ids).logits.detach().numpy()
    logits = np.asarray(runtime.generator.forward_batch(prompts))
    assert np.abs(logits - expected).max() < LOGIT_ATOL
    # the summed log-likelihood, against log_softmax written out in float64
    total, count = runtime.log_likelihood(prompts)
    log_probs = torch.log_softmax(torch.tensor(expected, dtype=torch.float64)[:, :-1], -1)
    reference = float(log_probs.gather(-1, ids[:, 1:, None]).sum())
    assert count == ids[:, 1:].numel()
    assert total == pytest.approx(reference, rel=1e-4)
    # greedy tokens, where every choice is clear
    assert _greedy_margin(model, prompts, 12) > 1e-2
    torch_tokens = TorchCausalLM(model).generate(prompts, 12)
    assert runtime.generate(prompts, 12) == torch_tokens
    assert all(len(row) == 12 for row in torch_tokens)


def test_fixed_length_decoding_goes_on_past_the_end_token(tmp_path):
    """The report's fixed lengths turn the end token off rather than forbid it: where greedy decoding reaches the end
    token, PyTorch and the deployed runtime both decode it and go on, as transformers' generate does with no end
    token; by default the same token ends decoding in both (so the deployed model does know it as its end)."""
    model, tokenizer, _ = _llama(tmp_path)
    prompts = _prompts(tokenizer)
    free = model.generate(torch.tensor(prompts), max_new_tokens=12, eos_token_id=[], do_sample=False)[:, 6:]
    end = int(free[0, 3])  # the token row 0 reaches at its 4th step becomes the end token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    model.config.eos_token_id = model.generation_config.eos_token_id = end
    folder = tmp_path / "llama_end"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stopped = model.generate(torch.tensor(prompts[:1]), max_new_tokens=12, do_sample=False)[0, 6:]
    # transformers stops at it by default
    assert stopped.tolist()[:4] == free[0, :4].tolist() and len(stopped) == 4
    assert _greedy_margin(model, prompts, 12) > 1e-2
    runtime = CTranslate2CausalLM(
        export_ctranslate2(folder, tmp_path / "ct2", quantization="float32"), num_threads=1
    )
    start = runtime.vocabulary.to_tokens(prompts[0])
    default = runtime.generator.generate_batch(
        [start], max_length=12, sampling_topk=1, include_prompt_in_result=False
    )
    # ctranslate2 ends on it by default (and does not return it)
    assert default[0].sequences_ids[0] == free[0, :3].tolist()
    assert TorchCausalLM(model).generate(prompts, 12) == free.tolist()
    assert runtime.generate(prompts, 12) == free.tolist()


def test_int8_export_keeps_most_greedy_tokens_and_a_quarter_of_the_size(tmp_path):
    model, tokenizer, folder = _llama(tmp_path, hidden=128, head_dim=32)
    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="int8")
    prompts = _prompts(tokenizer)
    expected = np.array(TorchCausalLM(model).generate(prompts, 16))
    produced = np.array(load_generation_model(deployed, num_threads=1).generate(prompts, 16))
    assert (produced == expected).mean() >= INT8_AGREEMENT
    fp32_bytes = (folder / "model.safetensors").stat().st_size
    assert deployed_size(deployed) == (deployed / "model.bin").stat().st_size
    assert deployed_size(deployed) < 0.45 * fp32_bytes  # int8 matrices; norms and scales stay float32


def test_pruned_llama_with_explicit_head_size_converts(tmp_path):
    """8 heads of 16 at hidden 64 (hidden != heads x head_dim): CTranslate2's Llama loader would assume head size
    8; the export goes through its Mistral loader, which reads head_dim."""
    model, tokenizer, folder = _llama(tmp_path, heads=8, kv_heads=4, head_dim=16, hidden=64)
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="float32")
    prompts = _prompts(tokenizer)
    expected = model(input_ids=torch.tensor(prompts)).logits.detach().numpy()
    logits = np.asarray(CTranslate2CausalLM(deployed).generator.forward_batch(prompts))
    assert np.abs(logits - expected).max() < LOGIT_ATOL


def test_translator_greedy_translations_match_pytorch(tmp_path):
    tokenizer = make_seq2seq_tokenizer()
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )  # fmt: skip
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias[:, tokenizer.eos_token_id] = -1e4  # never end early: fixed-length outputs
    folder = tmp_path / "marian"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="float32")
    sources = [tokenizer(text)["input_ids"] for text in ("the cat is big", "a dog and a tree", "hello world")]
    expected = TorchTranslator(model).translate(sources, max_new_tokens=10)
    produced = CTranslate2Translator(deployed, num_threads=1).translate(sources, max_new_tokens=10)
    assert produced == expected
    assert isinstance(load_generation_model(deployed), CTranslate2Translator)


def _translator(kind, tokenizer):
    """A tiny translator as a trained one looks where it matters here: the decoder's start-token row is an ordinary,
    non-zero embedding (training ties it to the LM head, which gives it gradients), and the LM head is peaked (clear
    greedy margins). For Marian, the start token is `<pad>` (the recipe's convention, and `generate`'s)."""
    size = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)  # fmt: skip
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "marian":
        config = MarianConfig(vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), scale_embedding=True,
                              share_encoder_decoder_embeddings=True, tie_word_embeddings=False,
                              decoder_start_token_id=tokenizer.pad_token_id, **size, **ids)  # fmt: skip
        model = MarianMTModel(config)
    elif kind == "bart":
        config = BartConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                            decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=None, **size, **ids)  # fmt: skip
        model = BartForConditionalGeneration(config)
    else:
        config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, **ids)  # fmt: skip
        model = T5ForConditionalGeneration(config)
    model.eval()
    start = config.decoder_start_token_id
    with torch.no_grad():
        embeddings = model.get_decoder().embed_tokens.weight
        embeddings[start] = (
            torch.randn(embeddings.shape[1]) * embeddings[len(tokenizer.all_special_tokens) :].std() * 3
        )
        model.lm_head.weight.mul_(30.0)
    return model


def _greedy(model, sources, new_tokens, start=None):
    """transformers' greedy decoding (the reference), exactly `new_tokens` tokens per row, the start token dropped."""
    input_ids = torch.tensor(sources)
    start = {} if start is None else {"decoder_start_token_id": start}
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=1, do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, forced_bos_token_id=None, forced_eos_token_id=None, **start,
    )  # fmt: skip
    return output[:, 1:].tolist()


@pytest.mark.parametrize("kind", ["marian", "bart", "t5"])
def test_translator_decodes_from_the_models_own_start_token(tmp_path, kind):
    """CTranslate2's Marian converter starts the decoder from a zero embedding (the Hub's OPUS-MT `<pad>` row);
    a Marian trained here has a non-zero start row, and the export decoded something else (the translation demo's
    teacher lost 6 BLEU). The model below is built so the start token decides the first tokens (checked), and the
    float32 export must then give transformers' own greedy tokens."""
    tokenizer = make_seq2seq_tokenizer()
    if kind == "bart":  # CTranslate2's BART config needs a bos token; BART's own start token is `</s>`
        tokenizer.bos_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = _translator(kind, tokenizer)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = np.random.default_rng(0)
    low = len(tokenizer.all_special_tokens)
    sources = [
        [*rng.integers(low, len(tokenizer), size=7).tolist(), tokenizer.eos_token_id] for _ in range(8)
    ]
    new_tokens = 8
    expected = _greedy(model, sources, new_tokens)
    # The test can fail: another start token, or the start row zeroed, changes the first tokens.
    other = tokenizer.eos_token_id if model.config.decoder_start_token_id != tokenizer.eos_token_id else low
    first_tokens = [row[0] for row in expected]
    assert [row[0] for row in _greedy(model, sources, new_tokens, start=other)] != first_tokens
    zeroed = _translator(kind, tokenizer)
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        zeroed.get_decoder().embed_tokens.weight[model.config.decoder_start_token_id] = 0.0
    assert [row[0] for row in _greedy(zeroed, sources, new_tokens)] != first_tokens

    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="float32")
    runtime = CTranslate2Translator(deployed, num_threads=1)
    results = runtime.translator.translate_batch(
        [runtime.source_vocabulary.to_tokens(source) for source in sources],
        beam_size=1, max_decoding_length=new_tokens, min_decoding_length=new_tokens,
    )  # fmt: skip
    produced = [[runtime.target_ids[token] for token in result.hypotheses[0]] for result in results]
    assert [row[0] for row in produced] == first_tokens
    agreeing = sum(p == e for got, want in zip(produced, expected) for p, e in zip(got, want))
    assert all(len(row) == new_tokens for row in produced)
    assert agreeing >= TRANSLATOR_AGREEMENT * len(sources) * new_tokens, (produced, expected)
    if (
        kind == "marian"
    ):  # the user's call (docs/GENERATION.md), in a process without torch: the same translation
        expected_text = tokenizer.decode(_greedy(model, [tokenizer("the cat is big")["input_ids"]], 6)[0])
        script = (
            "import sys, ctranslate2, tokenizers\n"
            f"path = {str(deployed)!r}\n"
            "tokenizer = tokenizers.Tokenizer.from_file(path + '/tokenizer.json')\n"
            "translator = ctranslate2.Translator(path, device='cpu')\n"
            "tokens = tokenizer.encode('the cat is big').tokens\n"
            "result = translator.translate_batch([tokens], beam_size=1, max_decoding_length=6, min_decoding_length=6)\n"
            "ids = [tokenizer.token_to_id(token) for token in result[0].hypotheses[0]]\n"
            "print(tokenizer.decode(ids))\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert completed.stdout.strip() == expected_text


def test_deployed_folder_runs_with_the_runtime_alone(tmp_path):
    model, tokenizer, folder = _llama(tmp_path)
    deployed = export_ctranslate2(folder, tmp_path / "ct2", quantization="int8")
    info = json.loads((deployed / "deployment.json").read_text())
    assert info["runtime"] == "ctranslate2" and info["params"] == sum(p.numel() for p in model.parameters())
    script = (
        "import sys, ctranslate2, tokenizers\n"
        f"path = {str(deployed)!r}\n"
        "tokenizer = tokenizers.Tokenizer.from_file(path + '/tokenizer.json')\n"
        "generator = ctranslate2.Generator(path, device='cpu')\n"
        "tokens = tokenizer.encode('the cat is big').tokens\n"
        "result = generator.generate_batch([tokens], max_length=5, sampling_topk=1, include_prompt_in_result=False)\n"
        "assert len(result[0].sequences_ids[0]) >= 1\n"
        "print(tokenizer.decode(result[0].sequences_ids[0]))\n"
        "assert 'torch' not in sys.modules and 'hf_distill' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
