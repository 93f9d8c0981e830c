"""Compression: smaller, faster models that load with the standard loaders and run without this package.

- pruning/         structured (heads, FFN neurons, hidden width, layers) and vocabulary pruning into ordinary models
- int8_scheme.py   the INT8 arithmetic (7-bit weights per channel, static uint8 activations) shared by the two below
- quantization.py  ONNX export and INT8 quantization (`onnx_int8.py` rewrites the graph, `onnx_export.py` helps
                   the exporter); the graph is made fast on every x86 CPU by `onnx_fusions.py` (attention and
                   GELU as single ONNX Runtime nodes) and `onnx_first_token.py` (the last layer computes only
                   the token the classifier reads)
- qat.py           quantization-aware training that simulates exactly the deployed INT8 model
- deployed.py      loading, running and sizing a deployed folder
- recipe.py        a compression recipe: its stages, their settings and every check made before the first stage
- report.py        the compression report: every stage against the teacher, with a plot
- generation_runtime.py, torch_generation.py   causal LMs and translators exported to CTranslate2 (the
                   `generation` extra) and run, with the PyTorch reference behind the same calls
- generation_recipe.py, generation_report.py   recipes (task: causal_lm / translation) and their report
- assisted.py      whether a draft can assist a teacher, and assisted decoding with acceptance counts

onnx and onnxruntime (the `compress` extra) and ctranslate2 (the `generation` extra) are imported only where a
function needs them. May import
students.py, reporting/, storage/ and losses/; the compression recipe's flow is in tasks/compression.
"""
