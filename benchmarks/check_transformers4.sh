#!/usr/bin/env bash
# Question: do the folders hf_distill deploys (vocabulary-pruned PyTorch stages and their ONNX exports) load in
# transformers 4, as optimum needs (optimum-onnx requires transformers < 4.58) and as a transformers-4 pipeline()
# does? A manual check, not part of CI: it installs packages from PyPI into a venv of its own.
#
#   . .venv/bin/activate                                   # this project's environment (transformers 5)
#   benchmarks/check_transformers4.sh                      # a tiny vocabulary-pruned classifier, built here
#   benchmarks/check_transformers4.sh outputs/compress_bbc # every stage of a scripts/compress.py run
#
# 1. In this project's environment, unless a compress.py output folder is given: a tiny BERT classifier with a
#    vocabulary-pruned tokenizer (prune_vocabulary, saved with save_pretrained: a PyTorch stage) and its ONNX export
#    (hf_distill.quantization.export_onnx). For every folder, the logits transformers 5 (or ONNX Runtime) computes on
#    a few texts are written to expected.json.
# 2. A venv of its own ($CHECK_VENV, default ~/.cache/hf_distill/transformers4-venv, reused when it exists) gets
#    `pip install "transformers<4.58" optimum-onnx onnxruntime` and torch ($TORCH_REQUIREMENT, default "torch"; on a
#    machine without a GPU a CPU wheel such as "torch==2.13.0+cpu" from a local wheel folder saves a large download).
# 3. There, each PyTorch stage is loaded by transformers-4's pipeline("text-classification") and exported by
#    optimum (ORTModelForSequenceClassification.from_pretrained(stage, export=True)), and each ONNX folder is loaded
#    by ORTModelForSequenceClassification; their logits are compared with step 1's (max |difference| <= 1e-4; an
#    INT8 stage is compared with its own ONNX Runtime logits). A control row saves one stage's tokenizer under
#    transformers 5's class name, TokenizersBackend, which transformers 4 must fail to load.
# Prints one line per check and "ALL CHECKS PASS" or "SOME CHECKS FAIL" (exit status 1).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${CHECK_DIR:-$(mktemp -d -t hf_distill_t4_XXXXXX)}"
VENV="${CHECK_VENV:-$HOME/.cache/hf_distill/transformers4-venv}"
TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch}"
PROJECT_PYTHON="${PROJECT_PYTHON:-python}"
mkdir -p "$WORK"
echo "work folder: $WORK"

# --- 1. folders and expected logits, with transformers 5 --------------------------------------------------------
"$PROJECT_PYTHON" - "$WORK" "${1:-}" <<'PY'
import json, os, shutil, sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

work, compress_output = Path(sys.argv[1]), sys.argv[2]
texts = ["the movie was wonderful", "a boring and very long plot", "unbelievable acting, great music!"]
folders = {}
if compress_output:
    for stage in sorted((Path(compress_output) / "stages").iterdir()):
        if (stage / "model.onnx").is_file():
            folders[stage.name] = ("onnx", stage)
        elif (stage / "config.json").is_file():
            folders[stage.name] = ("pytorch", stage)
else:
    from hf_distill.pruning import prune_vocabulary, tokens_used
    from hf_distill.quantization import export_onnx

    corpus = texts * 3 + ["the plot of the movie", "music and acting were wonderful", "unbelievably boring"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(corpus * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    backend.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
    )
    model, pruned_tokenizer = prune_vocabulary(
        BertForSequenceClassification(config).eval(), tokenizer, tokens_used(tokenizer, corpus)
    )
    model.save_pretrained(work / "pruned")
    pruned_tokenizer.save_pretrained(work / "pruned")
    export_onnx(model.eval(), pruned_tokenizer, work / "pruned_onnx", max_length=32, overwrite=True)
    folders = {"pruned": ("pytorch", work / "pruned"), "pruned_onnx": ("onnx", work / "pruned_onnx")}

# The control: the first PyTorch stage with the tokenizer class transformers 5 writes for a reloaded tokenizer.
first = next(path for kind, path in folders.values() if kind == "pytorch")
control = work / "control_tokenizersbackend"
shutil.copytree(first, control, dirs_exist_ok=True)
tokenizer_config = json.loads((control / "tokenizer_config.json").read_text())
tokenizer_config["tokenizer_class"] = "TokenizersBackend"
(control / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

expected = {"texts": texts, "folders": {}}
for name, (kind, path) in folders.items():
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    if kind == "pytorch":
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name].astype(np.int64) for i in session.get_inputs()}
        logits = session.run(None, feed)[0]
    tokenizer_class = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    expected["folders"][name] = {"kind": kind, "path": str(path), "logits": logits.tolist(),
                                 "tokenizer_class": tokenizer_class}
expected["control"] = str(control)
(work / "expected.json").write_text(json.dumps(expected, indent=2))
print(f"transformers {transformers.__version__}: {len(folders)} folder(s) to check")
PY

# --- 2. the transformers-4 environment ----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$TORCH_REQUIREMENT"
  "$VENV/bin/pip" install --quiet "transformers<4.58" optimum-onnx onnxruntime
fi

# --- 3. load every folder with transformers 4 and optimum ----------------------------------------------------------
"$VENV/bin/python" - "$WORK" <<'PY'
import json, sys, warnings
from importlib.metadata import version
from pathlib import Path

warnings.filterwarnings("ignore")
import numpy as np
import torch
import transformers
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer

transformers.logging.set_verbosity_error()
work = Path(sys.argv[1])
expected = json.loads((work / "expected.json").read_text())
texts = expected["texts"]
print(f"transformers {transformers.__version__}, optimum-onnx {version('optimum-onnx')}, "
      f"onnxruntime {version('onnxruntime')}, torch {torch.__version__}")
results = []


def check(name, what, run, reference):
    try:
        logits = np.asarray(run(), dtype=np.float64)
        error = float(np.abs(logits - np.asarray(reference)).max())
        ok = error <= 1e-4
        detail = f"max |logits - transformers 5's| = {error:.2e}"
    except Exception as exc:  # noqa: BLE001 - any failure to load or run is the finding
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<28} {what:<46} {detail}")


def ort_logits(folder, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForSequenceClassification.from_pretrained(folder, **kwargs)
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return model(**inputs).logits.detach().numpy()


def pipeline_logits(folder):
    classify = transformers.pipeline("text-classification", model=str(folder), device="cpu", top_k=None,
                                     function_to_apply="none")
    config = transformers.AutoConfig.from_pretrained(folder)
    rows = classify(texts, truncation=True, max_length=64)
    return [[{r["label"]: r["score"] for r in row}[config.id2label[i]] for i in range(config.num_labels)]
            for row in rows]


for name, entry in expected["folders"].items():
    folder, reference = Path(entry["path"]), entry["logits"]
    print(f"      {name}: tokenizer_class {entry['tokenizer_class']!r}")
    if entry["kind"] == "pytorch":
        check(name, "transformers-4 pipeline('text-classification')", lambda: pipeline_logits(folder), reference)
        check(name, "optimum ORTModel...(export=True)", lambda: ort_logits(folder, export=True), reference)
    else:
        check(name, "optimum ORTModelForSequenceClassification", lambda: ort_logits(folder), reference)

try:
    AutoTokenizer.from_pretrained(expected["control"])
    control_ok, detail = False, "loaded, so the control does not show the failure"
except Exception as exc:  # noqa: BLE001
    control_ok, detail = True, f"refused as expected ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
results.append(control_ok)
print(f"{'PASS' if control_ok else 'FAIL'}  {'control':<28} {'TokenizersBackend folder in transformers 4':<46} {detail}")
print("ALL CHECKS PASS" if all(results) else "SOME CHECKS FAIL")
sys.exit(0 if all(results) else 1)
PY
