"""Which runtime should serve a distilled causal LM (and a translator) on CPU, with a KV cache?

Question: greedy decoding tokens/s at batch 1 and 8, time to first token, size on disk, install weight and whether
torch is needed at serving time, for PyTorch float32 (the reference), PyTorch with dynamic INT8 Linear layers,
CTranslate2 float32 and INT8 (`hf_distill.compression.generation_runtime`), and onnxruntime-genai float32 and
INT4 (its CPU recommendation; built by its own model builder) where it is installed (otherwise listed as not
measured, with the reason). llama.cpp (llama-cpp-python) builds from source on install, minutes of both cores on
this shared machine: not measured.

Model: a Llama of 8 layers x 512 (8 heads, FFN 1,024, vocabulary 4,096: about 23M parameters, the size of the
compression demo's teacher), random weights unless `--model DIR` names a trained one; 8 prompts of 32 random
tokens, 64 new tokens, greedy, fixed length (the end token does not stop a row). Every runtime lives in this process
and is timed in the same alternating rounds (`hf_distill.reporting.decoding.measure_decoding`): decode tokens/s are
the tokens after the first over the time they took, time to first token apart. Fidelity: the share of greedy
positions equal to PyTorch float32's (random weights make near-ties, so this is harsh; with `--model` it is the
trained model's). Translation (`--translation`, on by default): a Marian 3+3 x 256, 8 sources of 16 tokens,
32 target tokens (end token blocked), sentences/s.

    python benchmarks/bench_generation_runtime.py                 # ~5 minutes on 2 CPU cores
    python benchmarks/bench_generation_runtime.py --model outputs/compress_bbc_lm/stages/teacher
    python benchmarks/bench_generation_runtime.py --smoke         # tiny models, seconds; checks the script

Writes benchmarks/results/bench_generation_runtime.{json,png} (`--results_dir`; --smoke: *_smoke.*).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_distill.compression.generation_runtime import (  # noqa: E402
    CTranslate2CausalLM,
    CTranslate2Translator,
    deployed_size,
    export_ctranslate2,
)
from hf_distill.compression.torch_generation import TorchCausalLM, TorchTranslator  # noqa: E402
from hf_distill.reporting.decoding import measure_decoding  # noqa: E402
from hf_distill.reporting.latency import time_alternately  # noqa: E402
from hf_distill.reporting.machine import describe_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds: checks the script")
    parser.add_argument("--model", default=None, help="a trained causal-LM folder instead of random weights")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-translation", dest="translation", action="store_false")
    parser.add_argument("--results_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.vocab, args.new_tokens, args.repeats = 2, 64, 256, 4, 1
        args.prompt_tokens = 8
    return args


def install_mib(*distributions: str) -> float | None:
    """Installed size of distributions (their RECORD files), MiB; None when one is missing."""
    total = 0
    for name in distributions:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        total += sum(f.size or 0 for f in files)
    return total / 2**20


def build_llama(args: argparse.Namespace, folder: Path) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8 if args.hidden >= 128 else 4,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3",
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


class OrtGenAICausalLM:
    """A folder built by onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`), run by its
    own generator loop (KV cache inside): greedy, exactly `max_new_tokens` per row."""

    runtime = "onnxruntime-genai"

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        length = len(prompts[0])
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=length + max_new_tokens, min_length=length + max_new_tokens, do_sample=False,
            batch_size=len(prompts),
        )  # fmt: skip
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array(prompts, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return [[int(t) for t in generator.get_sequence(i)[length:]] for i in range(len(prompts))]


def build_ortgenai(folder: Path, output: Path, precision: str) -> Path:
    """onnxruntime-genai's model builder, in a subprocess (its command line is its supported entry point)."""
    import subprocess

    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(output),
               "-p", precision, "-e", "cpu", "-c", str(output.parent / "ortgenai_cache")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return output


class DynamicInt8(TorchCausalLM):
    """PyTorch with its Linear layers quantized dynamically to INT8 (`torch.ao.quantization.quantize_dynamic`)."""

    runtime = "pytorch-int8-dynamic"

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)


def causal_lm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = Path(args.model) if args.model else build_llama(args, work / "llama")
    models: dict[str, Any] = {"torch fp32": TorchCausalLM(folder)}
    sizes = {"torch fp32": deployed_size(folder)}
    notes: dict[str, str] = {}
    try:
        models["torch int8 dynamic"] = DynamicInt8(folder)
        sizes["torch int8 dynamic"] = None
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        notes["torch int8 dynamic"] = f"failed: {type(error).__name__}: {error}"
    for quantization in ("float32", "int8"):
        path = export_ctranslate2(folder, work / f"ct2_{quantization}", quantization=quantization)
        name = f"ctranslate2 {quantization}"
        models[name] = CTranslate2CausalLM(path, num_threads=args.threads)
        sizes[name] = deployed_size(path)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        notes["onnxruntime-genai"] = "not installed (pip install onnxruntime-genai); not measured"
    else:
        for precision in ("fp32", "int4"):  # int4: its CPU recommendation (MatMulNBits weights)
            name = f"onnxruntime-genai {precision}"
            try:
                path = build_ortgenai(folder, work / f"ortgenai_{precision}", precision)
                models[name] = OrtGenAICausalLM(path, args.threads)
                sizes[name] = sum(f.stat().st_size for f in path.glob("model.onnx*"))
            except Exception as error:  # noqa: BLE001 - reported, not hidden
                notes[name] = f"failed: {type(error).__name__}: {str(error)[-300:]}"
    notes["llama.cpp"] = (
        "llama-cpp-python compiles llama.cpp on install (minutes of both shared cores); not measured"
    )
    rng = np.random.default_rng(0)
    vocab = models["torch fp32"].model.config.vocab_size
    prompts = [rng.integers(4, vocab, size=args.prompt_tokens).tolist() for _ in range(8)]
    speeds = measure_decoding(
        models, prompts, batch_sizes=(1, 8), new_tokens=args.new_tokens, repeats=args.repeats
    )
    reference = np.array(models["torch fp32"].generate(prompts, args.new_tokens))
    rows = {}
    for name, model in models.items():
        tokens = np.array(model.generate(prompts, args.new_tokens))
        rows[name] = {
            "speed": {batch: speed.to_dict() for batch, speed in speeds[name].items()},
            "size_bytes": sizes[name],
            "greedy_agreement": float((tokens == reference).mean()),
        }
    return {"model": str(folder), "params": models["torch fp32"].params, "rows": rows, "notes": notes}


def translation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tokenizers import Tokenizer, models, processors
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    hidden = 64 if args.smoke else 256
    vocab = {f"w{i}": i for i in range(1000 if not args.smoke else 128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    backend.post_processor = processors.TemplateProcessing(single="$A w1", special_tokens=[("w1", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", eos_token="w1", unk_token="w2"
    )
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=hidden, encoder_layers=3, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * hidden, decoder_ffn_dim=4 * hidden,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, scale_embedding=True,
    )  # fmt: skip
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias[:, 1] = -1e4  # fixed-length outputs: every runtime does the same work
    folder = work / "marian"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runtimes = {"torch fp32": TorchTranslator(folder)}
    for quantization in ("float32", "int8"):
        path = export_ctranslate2(folder, work / f"marian_{quantization}", quantization=quantization)
        runtimes[f"ctranslate2 {quantization}"] = CTranslate2Translator(path, num_threads=args.threads)
    rng = np.random.default_rng(1)
    sources = [rng.integers(3, len(vocab), size=15).tolist() + [1] for _ in range(8)]
    new_tokens = 8 if args.smoke else 32
    rows: dict[str, Any] = {name: {} for name in runtimes}
    for batch in (1, 8):
        runners = {
            name: (lambda model=model, rows=sources[:batch]: model.translate(rows, max_new_tokens=new_tokens))
            for name, model in runtimes.items()
        }
        for name, timing in time_alternately(runners, repeats=args.repeats, warmup=1).items():
            rows[name][batch] = {"median_ms": timing.median_ms, "sentences_per_s": batch * 1000 / timing.median_ms,
                                 "spread": timing.spread}  # fmt: skip
    return {"params": sum(p.numel() for p in model.parameters()), "new_tokens": new_tokens, "rows": rows}


def print_tables(results: dict[str, Any]) -> None:
    lm = results["causal_lm"]
    print(f"\nCausal LM ({lm['params'] / 1e6:.1f}M parameters), {results['threads']} threads")
    print("| runtime | TTFT ms b1 | decode tok/s b1 | decode tok/s b8 | vs torch b1 | vs torch b8 | size MB | "
          "greedy agreement |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = lm["rows"]["torch fp32"]["speed"]

    def ratio(value: float | None, reference: float | None) -> str:
        return "-" if value is None or not reference else f"{value / reference:.2f}x"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, row in lm["rows"].items():
        speed = row["speed"]
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.1f}"
        b1, b8 = speed[1]["decode_tokens_per_s"], speed[8]["decode_tokens_per_s"]
        print(
            f"| {name} | {speed[1]['ttft_ms']:.1f} | {rate(b1)} | {rate(b8)} | "
            f"{ratio(b1, base[1]['decode_tokens_per_s'])} | {ratio(b8, base[8]['decode_tokens_per_s'])} | {size} | "
            f"{100 * row['greedy_agreement']:.0f}% |"
        )
    for name, note in lm["notes"].items():
        print(f"- {name}: {note}")
    print(f"- install weight: {results['install_mib']}")
    if "translation" in results:
        mt = results["translation"]
        print(f"\nTranslator ({mt['params'] / 1e6:.1f}M parameters), {mt['new_tokens']} target tokens")
        print("| runtime | sentences/s b1 | sentences/s b8 |")
        print("|---|---:|---:|")
        for name, row in mt["rows"].items():
            print(f"| {name} | {row[1]['sentences_per_s']:.1f} | {row[8]['sentences_per_s']:.1f} |")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["causal_lm"]["rows"]
    names = list(rows)
    figure, axis = plt.subplots(figsize=(8, 4))
    x = np.arange(len(names))
    for offset, batch in ((-0.2, 1), (0.2, 8)):
        axis.bar(
            x + offset,
            [rows[n]["speed"][batch]["decode_tokens_per_s"] or float("nan") for n in names],  # None: too fast
            0.4,
            label=f"batch {batch}",
        )
    axis.set_xticks(x, names, rotation=15, fontsize=8)
    axis.set_ylabel("decode tokens/s (greedy)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("Causal-LM decoding on CPU by runtime")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        results: dict[str, Any] = {"causal_lm": causal_lm(args, work)}
        if args.translation:
            results["translation"] = translation(args, work)
    results.update(
        threads=args.threads,
        install_mib={
            "ctranslate2": install_mib("ctranslate2"),
            "torch": install_mib("torch"),
            "onnxruntime": install_mib("onnxruntime"),
            "onnxruntime-genai + onnxruntime": install_mib("onnxruntime-genai", "onnxruntime"),
        },  # fmt: skip
        cpu=describe_cpu(),
        torch=torch.__version__,
        ctranslate2=importlib.metadata.version("ctranslate2"),
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
        seconds=round(time.perf_counter() - started, 1),
        command=" ".join(sys.argv),
    )
    print_tables(results)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_generation_runtime" + ("_smoke" if args.smoke else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, results_dir / f"{stem}.png")
    print(f"\nwrote {results_dir / stem}.json and .png ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
