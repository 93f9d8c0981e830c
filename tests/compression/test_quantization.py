"""hf_distill.compression.quantization (ONNX export, static INT8 in ONNX Runtime, loading) and hf_distill.compression.qat (fake quantization).

The scheme's worst cases, batch independence and the CPU description are in test_quantization_scheme.py; the same
checks on an emulated AVX2-only CPU in test_quantization_avx2.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TEXTS_FOR_TESTS, make_bert_tokenizer
from test_quantization_scheme import assert_same_quantized_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_distill.compression.qat import (  # noqa: E402
    QATEmbedding,
    QATLinear,
    activation_ranges,
    calibrate_qat,
    fake_quantize_table_uint8,
    fake_quantize_uint8,
    fake_quantize_weight_int8,
    has_fake_quant,
    prepare_qat,
    strip_qat,
)
from hf_distill.compression.quantization import (  # noqa: E402
    OnnxSequenceClassifier,
    export_onnx,
    load_deployed,
    module_name_matches,
    quantize_int8,
    size_on_disk,
)
from hf_distill.reporting.latency import batch_runner  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(tokenizer, *, hidden=32, layers=2, intermediate=37, labels=3, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def encode(tokenizer, texts=TEXTS_FOR_TESTS[:8]):
    """Every other row a pair (so token type 1 occurs), rows of different lengths (so padding occurs)."""
    rows = [
        dict(tokenizer(text, texts[(i + 1) % len(texts)]) if i % 2 else tokenizer(text))
        for i, text in enumerate(texts)
    ]
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")(rows)


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(**batch).logits.numpy()


def calibration_batches(tokenizer):
    """All test texts (pairs included) in batches of 4: the calibration set of the tests."""
    return [
        encode(tokenizer, TEXTS_FOR_TESTS[start : start + 4]) for start in range(0, len(TEXTS_FOR_TESTS), 4)
    ]


def deployed_ranges(folder) -> dict:
    return json.loads((folder / "quantization.json").read_text())["activation_ranges"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A BERT whose weights dominate its file (hidden 128), exported and quantized both ways once per module."""
    tokenizer = make_bert_tokenizer()
    model = tiny_bert(tokenizer, hidden=128, intermediate=512)
    root = tmp_path_factory.mktemp("deployed")
    attention = model.config._attn_implementation
    onnx_dir = export_onnx(model, tokenizer, root / "onnx", max_length=32)
    calibration = calibration_batches(tokenizer)
    return {
        "attention": attention,
        "tokenizer": tokenizer,
        "model": model,
        "onnx": onnx_dir,
        "calibration": calibration,
        "int8": quantize_int8(onnx_dir, root / "int8", calibration=calibration),
        "int8_tensor": quantize_int8(
            onnx_dir, root / "int8_tensor", per_channel=False, calibration=calibration
        ),
        "root": root,
    }


# --------------------------------------------------------------------------------------------- export / PTQ
def test_export_matches_pytorch_with_dynamic_axes(deployed):
    tokenizer, model = deployed["tokenizer"], deployed["model"]
    assert model.training is False and model.config._attn_implementation == deployed["attention"]  # restored
    graph = onnx.load(str(deployed["onnx"] / "model.onnx")).graph
    inputs = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in graph.input
    }
    assert inputs == {
        name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    assert [value.name for value in graph.output] == ["logits"]
    classifier = OnnxSequenceClassifier(deployed["onnx"], num_threads=1)
    for batch in (
        encode(tokenizer),
        encode(tokenizer, TEXTS_FOR_TESTS[:1]),
    ):  # 8 x padded, and 1 x its own length
        np.testing.assert_allclose(
            classifier.predict_logits(batch), torch_logits(model, batch), atol=1e-4, rtol=0
        )
    info = json.loads((deployed["onnx"] / "onnx_export.json").read_text())
    assert (
        info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
        and info["max_abs_diff_vs_torch"] < 1e-4
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (deployed["onnx"] / name).is_file()


def test_int8_reloads_and_agrees_with_fp32(deployed):
    tokenizer, model = deployed["tokenizer"], deployed["model"]
    batch = encode(tokenizer)
    reference = torch_logits(model, batch)
    for folder in (deployed["int8"], deployed["int8_tensor"]):
        classifier = load_deployed(folder)
        assert isinstance(classifier, OnnxSequenceClassifier)
        logits = classifier.predict_logits({key: value.numpy() for key, value in batch.items()})
        assert logits.shape == reference.shape and logits.dtype == np.float32
        # INT8 rounds each Linear's input to 1/255 of its range and each weight to 1/128 of its channel's range;
        # through two blocks that is a few percent of the logits' spread. 10% of it is a loose bound that still
        # catches a wrong scale, a transposed weight or a float model written by mistake (which would be exact).
        spread = reference.max() - reference.min()
        difference = np.abs(logits - reference).max()
        assert 0 < difference < 0.1 * spread
        assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.75
        assert classifier.config.num_labels == 3 and classifier.tokenizer("a cat")["input_ids"]


def test_int8_is_smaller_and_keeps_the_classifier_float(deployed, tmp_path):
    fp32, int8 = size_on_disk(deployed["onnx"]), size_on_disk(deployed["int8"])
    assert fp32 == (deployed["onnx"] / "model.onnx").stat().st_size
    assert fp32 / int8 > 2.5
    assert size_on_disk(deployed["int8_tensor"]) <= int8  # per-tensor: one scale per matrix, not per row

    graph = onnx.load(str(deployed["int8"] / "model.onnx")).graph
    initializers = {item.name: item for item in graph.initializer}
    classifier_weights = [name for name in initializers if "classifier.weight" in name]
    assert classifier_weights and all(
        initializers[n].data_type == onnx.TensorProto.FLOAT for n in classifier_weights
    )
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 * 6 + 1  # six Linears per block, and the pooler
    assert ops.count("QuantizeLinear") == 2 * 4 + 1  # query, key and value share their input's
    assert "DynamicQuantizeLinear" not in ops  # static ranges: nothing depends on the rest of the batch
    info = json.loads((deployed["int8"] / "quantization.json").read_text())
    assert info["float_modules"] == ["classifier"] and "bert.pooler.dense" in info["quantized_modules"]
    assert "bert.embeddings.word_embeddings" in info["quantized_modules"]
    assert info["activation_range_source"] == "calibration" and info["calibration"]["batches"] == 4
    assert set(info["activation_ranges"]) == {m for m in info["quantized_modules"] if "embeddings" not in m}
    assert info["cpu"]["model"] and "avx2" in info["cpu"]["flags"] and info["cpu"]["u8s8_kernel"]

    everything = quantize_int8(
        deployed["onnx"], tmp_path / "all", keep_float=(), calibration=deployed["calibration"]
    )
    graph = onnx.load(str(everything / "model.onnx")).graph
    assert [node.op_type for node in graph.node].count("MatMulIntegerToFloat") == 2 * 6 + 2

    model = deployed["model"]
    model.save_pretrained(tmp_path / "torch")
    assert size_on_disk(tmp_path / "torch") == (tmp_path / "torch" / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="No weight files"):
        size_on_disk(tmp_path / "all" / "..")


def test_load_deployed_gives_the_torch_model_back(deployed, tmp_path):
    model = deployed["model"]
    model.save_pretrained(tmp_path)
    loaded = load_deployed(tmp_path)
    assert type(loaded) is BertForSequenceClassification and not loaded.training
    batch = encode(deployed["tokenizer"])
    np.testing.assert_allclose(torch_logits(loaded, batch), torch_logits(model, batch), atol=1e-6)
    with pytest.raises(ValueError, match="neither model.onnx nor a Hugging Face model"):
        load_deployed(tmp_path / "missing")


def test_runners_time_onnx_models(deployed):
    batch = encode(deployed["tokenizer"])
    classifier = load_deployed(deployed["int8"])
    expected = classifier(**batch)
    np.testing.assert_array_equal(batch_runner(classifier, batch)(), expected)
    np.testing.assert_array_equal(batch_runner(classifier.session, batch)()[0], expected)
    # Extra keys (labels) are ignored and a missing token_type_ids means all zeros.
    without_types = {key: value for key, value in batch.items() if key != "token_type_ids"}
    zeros = np.zeros_like(batch["input_ids"].numpy())
    np.testing.assert_array_equal(
        classifier.predict_logits({**without_types, "labels": [0] * 8}),
        classifier.predict_logits({**without_types, "token_type_ids": zeros}),
    )


def test_export_and_quantize_write_atomically(deployed, tmp_path, monkeypatch):
    tokenizer, model = deployed["tokenizer"], deployed["model"]
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, tokenizer, deployed["onnx"])

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(model, tokenizer, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one is left
    with pytest.raises(ValueError, match="needs .*model.onnx"):
        quantize_int8(tmp_path, tmp_path / "int8")
    with pytest.raises(ValueError, match="calibration="):  # static ranges need data, and the error says so
        quantize_int8(deployed["onnx"], tmp_path / "int8")
    ranges = deployed_ranges(deployed["int8"])
    del ranges["bert.pooler.dense"]
    with pytest.raises(ValueError, match="no \\(low, high\\) for \\['bert.pooler.dense'\\]"):
        quantize_int8(deployed["onnx"], tmp_path / "int8", activation_ranges=ranges)
    assert not (tmp_path / "int8").exists()


def test_module_name_matching():
    assert module_name_matches("classifier", ["classifier"])
    assert module_name_matches("model.classifier", ["classifier"])
    assert module_name_matches("bert.pooler.dense", ["pooler"])
    assert not module_name_matches("pre_classifier", ["classifier"])
    assert not module_name_matches("bert.encoder.layer.0.output.dense", ["classifier", "pooler"])


# --------------------------------------------------------------------------------------------- fake quantization
def reference_int8_symmetric(weight: np.ndarray, per_channel: bool) -> np.ndarray:
    """float64 quantize-dequantize on the deployed weight grid: scale = max|w| / 64 (stored float32),
    q = round half to even (numpy.round) of w / scale, clipped to [-64, 64]."""
    w = weight.astype(np.float64)
    absmax = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max()
    scale = (absmax / 64).astype(np.float32).astype(np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -64, 64) * scale


def reference_uint8_asymmetric(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """float64 quantize-dequantize with a static range, as ONNX QuantizeLinear / DequantizeLinear: range
    [min(low, 0), max(high, 0)], scale = range / 255 (stored float32), zero point = round(-low / scale),
    q = clip(round(x / scale) + zero point, 0, 255)."""
    x = x.astype(np.float64)
    low, high = min(low, 0.0), max(high, 0.0)
    scale = np.float64(np.float32((high - low) / 255)) if high > low else 1.0
    zero_point = np.clip(np.round(-low / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


def test_fake_quantized_weights_match_the_float64_reference():
    torch.manual_seed(0)
    weight = torch.randn(16, 24) * torch.linspace(0.01, 3, 16)[:, None]  # very different channel ranges
    weight[3] = 0.0  # an all-zero channel: scale 1, stays 0
    for per_channel in (True, False):
        expected = reference_int8_symmetric(weight.numpy(), per_channel)
        actual = fake_quantize_weight_int8(weight, per_channel=per_channel).double().numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)
    # Ties round half to even: with max|w| = 64 the scale is exactly 1.
    ties = torch.tensor([[64.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -63.5]])
    assert fake_quantize_weight_int8(ties).tolist() == [[64.0, 0.0, 2.0, 2.0, 0.0, -2.0, 3.0, -64.0]]


def test_fake_quantized_activations_match_the_reference_and_ort():
    torch.manual_seed(0)
    cases = [
        (torch.randn(4, 7, 32) * 3 + 1, -5.0, 9.0),  # values beyond the range saturate
        (torch.rand(64) + 0.5, 0.5, 1.5),  # a positive range is widened to contain 0
        (-torch.rand(64), -1.0, -0.1),
        (torch.zeros(5), 0.0, 0.0),  # an empty range: scale 1
    ]
    for x, low, high in cases:
        actual = fake_quantize_uint8(x, torch.tensor(low), torch.tensor(high)).double().numpy()
        np.testing.assert_allclose(
            actual, reference_uint8_asymmetric(x.numpy(), low, high), rtol=1e-6, atol=1e-12
        )
    # Range [-55, 200]: scale exactly 1, zero point 55; ties go to even, the ends saturate.
    ties = torch.tensor([-55.0, 200.0, 0.5, 1.5, 2.5, -0.5, -1.5, 7.25, -60.0, 230.0])
    expected = [-55.0, 200.0, 0.0, 2.0, 2.0, 0.0, -2.0, 7.0, -55.0, 200.0]
    assert fake_quantize_uint8(ties, torch.tensor(-55.0), torch.tensor(200.0)).tolist() == expected

    # ORT's own QuantizeLinear / DequantizeLinear kernels with the reference's scale and zero point.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"]),
        ],
        "static_quantize",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zero_point", TensorProto.UINT8, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, low, high in [(ties, -55.0, 200.0), (torch.randn(3, 50) * 2 - 0.7, -3.1, 2.2)]:
        scale = np.float32((high - low) / 255)
        zero_point = np.uint8(np.round(-low / np.float64(scale)))
        feed = {"x": x.numpy(), "scale": np.array(scale), "zero_point": np.array(zero_point)}
        np.testing.assert_array_equal(
            session.run(None, feed)[0], fake_quantize_uint8(x, torch.tensor(low), torch.tensor(high)).numpy()
        )


def test_fake_quantized_embedding_table_matches_the_reference():
    torch.manual_seed(0)
    table = torch.randn(30, 8) * 0.2 + 0.05
    expected = reference_uint8_asymmetric(table.numpy(), float(table.min()), float(table.max()))
    np.testing.assert_allclose(
        fake_quantize_table_uint8(table).double().numpy(), expected, rtol=1e-6, atol=1e-12
    )


def test_straight_through_gradient():
    torch.manual_seed(0)
    upstream = torch.randn(6, 10)
    for fake_quantize in (fake_quantize_table_uint8, fake_quantize_weight_int8):
        x = (torch.randn(6, 10) * 2).requires_grad_()
        fake_quantize(x).backward(upstream)
        torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)
    # Activations: identity inside the range, zero where the value saturates.
    x = (torch.randn(6, 10) * 2).requires_grad_()
    fake_quantize_uint8(x, torch.tensor(-1.0), torch.tensor(1.5)).backward(upstream)
    inside = (x.detach() >= -1.0) & (x.detach() <= 1.5)
    assert 0 < inside.sum() < inside.numel()
    torch.testing.assert_close(x.grad, upstream * inside, rtol=0, atol=0)

    # Through a QAT Linear: the weight's gradient is that of F.linear at the quantized values, passed straight on.
    linear = nn.Linear(10, 4)
    x = torch.randn(6, 10)
    ranges = {"0": (-5.0, 5.0)}
    model = prepare_qat(nn.Sequential(linear), skip=(), activation_ranges=ranges, range_momentum=0).train()
    model(x).backward(torch.ones(6, 4))
    x_q = fake_quantize_uint8(x, torch.tensor(-5.0), torch.tensor(5.0))
    expected = torch.ones(6, 4).T @ x_q  # d(sum(x_q W_q^T + b)) / dW_q
    torch.testing.assert_close(linear.weight.grad, expected, rtol=1e-6, atol=1e-6)


def test_training_tracks_the_input_range_and_eval_needs_one():
    torch.manual_seed(0)
    model = prepare_qat(nn.Sequential(nn.Linear(4, 3)), skip=(), range_momentum=0.25)
    layer = model[0]
    first, second = torch.randn(5, 4), torch.randn(5, 4) * 3
    with pytest.raises(ValueError, match="no input range"):
        model.eval()(first)
    model.train()(first)  # the first batch sets the range
    assert layer.input_range.tolist() == [first.min().item(), first.max().item()]
    model(second)  # then an exponential moving average
    expected = [0.75 * first.min() + 0.25 * second.min(), 0.75 * first.max() + 0.25 * second.max()]
    torch.testing.assert_close(layer.input_range, torch.stack(expected))
    frozen = prepare_qat(
        nn.Sequential(nn.Linear(4, 3)), skip=(), activation_ranges={"0": (-1, 2)}, range_momentum=0
    )
    frozen.train()(second)
    assert frozen[0].input_range.tolist() == [-1.0, 2.0] and activation_ranges(frozen) == {"0": (-1.0, 2.0)}


def test_prepare_and_strip_keep_parameters_and_keys():
    tokenizer = make_bert_tokenizer()
    model = tiny_bert(tokenizer).train()
    keys = list(model.state_dict())
    parameters = {name: id(p) for name, p in model.named_parameters()}
    prepare_qat(model)
    assert has_fake_quant(model) and model.training
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QATLinear)
    assert isinstance(model.bert.pooler.dense, QATLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, QATEmbedding)
    assert type(model.classifier) is nn.Linear  # skipped by default, as quantize_int8 keeps it float
    assert list(model.state_dict()) == keys  # a checkpoint saved during QAT loads into the plain model
    assert {name: id(p) for name, p in model.named_parameters()} == parameters  # the optimizer's tensors

    strip_qat(model)
    assert not has_fake_quant(model)
    assert list(model.state_dict()) == keys
    assert {name: id(p) for name, p in model.named_parameters()} == parameters
    for module in model.modules():
        assert type(module) not in (QATLinear, QATEmbedding)
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not torch.nn.utils.parametrize.is_parametrized(module)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Embedding"):
        prepare_qat(nn.Sequential(nn.Linear(2, 2)), skip=("0",))


@pytest.mark.parametrize("per_channel", [True, False])
def test_qat_forward_is_the_deployed_int8_model(deployed, per_channel):
    """The simulation is exact: the QAT model's logits are those ONNX Runtime computes with the INT8 folder."""
    batch = encode(deployed["tokenizer"])
    folder = deployed["int8" if per_channel else "int8_tensor"]
    ranges = deployed_ranges(folder)
    simulated = prepare_qat(
        copy.deepcopy(deployed["model"]), per_channel=per_channel, activation_ranges=ranges
    )
    int8 = load_deployed(folder)
    reference = torch_logits(deployed["model"], batch)
    # In eval mode QAT computes the deployed integer products exactly; what remains is float32 rounding in the float
    # ops (LayerNorm, softmax, scales): measured 3e-8 here. The INT8 error itself is ~1e-3, so 1e-5 separates "the
    # same quantized model" from "another quantization" by 100x (assert_same_quantized_model: rare one-step flips).
    assert_same_quantized_model(int8.predict_logits(batch), torch_logits(simulated, batch))
    assert np.abs(int8.predict_logits(batch) - reference).max() > 1e-3

    # QAT's own calibration (PyTorch hooks) finds the ranges ONNX Runtime's calibration found, to float32 rounding.
    calibrated = calibrate_qat(prepare_qat(copy.deepcopy(deployed["model"])), deployed["calibration"])
    assert calibrated.keys() == ranges.keys()
    for name, (low, high) in calibrated.items():
        np.testing.assert_allclose([low, high], ranges[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_export_refuses_a_model_with_fake_quantization(deployed, tmp_path):
    model = prepare_qat(copy.deepcopy(deployed["model"]))
    with pytest.raises(ValueError, match="strip_qat"):
        export_onnx(model, deployed["tokenizer"], tmp_path / "onnx")


def test_qat_student_distils_then_deploys_as_int8(tmp_path, bert_tokenizer):
    """QAT student against an fp32 teacher with DistillationTrainer, then strip -> export -> INT8 -> predictions."""
    from datasets import Dataset

    tokenizer = bert_tokenizer
    teacher = tiny_bert(tokenizer, layers=2, labels=2, seed=2)
    student = prepare_qat(tiny_bert(tokenizer, layers=1, labels=2, seed=1).train())
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    rows = dict(tokenizer(TEXTS_FOR_TESTS[:12], truncation=True))
    rows["labels"] = [i % 2 for i in range(12)]
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=3,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, temperature=2.0, alpha=0.5, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert has_fake_quant(trainer.model)
    changed = [
        name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])
    ]
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed and "classifier.weight" in changed

    trained_ranges = activation_ranges(trainer.model)  # tracked over the three training batches
    assert len(trained_ranges) == 6 + 1 and all(low < 0 < high for low, high in trained_ranges.values())
    simulated = torch_logits(copy.deepcopy(trainer.model).eval(), encode(tokenizer))
    student = strip_qat(trainer.model).eval()
    assert student.config.int8_qat["activation_ranges"] == {k: list(v) for k, v in trained_ranges.items()}
    # No calibration: quantize_int8 deploys the ranges QAT trained with, which travel in config.json.
    int8_dir = quantize_int8(
        export_onnx(student, tokenizer, tmp_path / "onnx", max_length=16), tmp_path / "int8"
    )
    assert json.loads((int8_dir / "quantization.json").read_text())["activation_range_source"].startswith(
        "qat"
    )
    batch = encode(tokenizer)
    logits = load_deployed(int8_dir).predict_logits(batch)
    assert logits.shape == (8, 2) and np.isfinite(logits).all()
    assert_same_quantized_model(logits, simulated)  # what QAT trained is what runs
