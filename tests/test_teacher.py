"""teacher.py: freezing, placement, sharded preparation (with fakes standing in for FSDP/DeepSpeed), alignment."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertModel

from hf_distill.teacher import forward_inputs, label_permutation, prepare_teacher, shared_vocab_size


def tiny_bert(**config):
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=30,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            **config,
        )
    ).train()


class FakeAccelerator:
    def __init__(self, distributed_type, deepspeed_config=None):
        self.distributed_type = distributed_type
        self.prepared = []
        self.state = types.SimpleNamespace(
            deepspeed_plugin=types.SimpleNamespace(deepspeed_config=deepspeed_config)
        )

    def prepare_model(self, model, evaluation_mode=False):
        self.prepared.append((model, evaluation_mode))
        return model


def test_plain_teacher_is_frozen_cast_and_moved():
    teacher = prepare_teacher(tiny_bert(), FakeAccelerator("NO"), torch.device("cpu"), dtype="bfloat16")
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())


def test_fsdp_teacher_is_prepared_by_accelerate_in_evaluation_mode():
    accelerator = FakeAccelerator("DistributedType.FSDP")
    teacher = prepare_teacher(tiny_bert(), accelerator, torch.device("cpu"))
    assert accelerator.prepared == [(teacher, True)]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("stage, expected_stage", [(2, 0), (3, 3)])
def test_deepspeed_teacher_gets_an_inference_engine_without_optimizer(monkeypatch, stage, expected_stage):
    seen = {}

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    def initialize(model, config):
        seen["config"] = config
        return Engine(model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    config = {
        "zero_optimization": {"stage": stage, "offload_param": {"device": "none"}},
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "train_micro_batch_size_per_gpu": 4,
    }
    accelerator = FakeAccelerator("DistributedType.DEEPSPEED", deepspeed_config=config)
    engine = prepare_teacher(tiny_bert(), accelerator, torch.device("cpu"))
    assert isinstance(engine, Engine) and not engine.training
    assert "optimizer" not in seen["config"] and "scheduler" not in seen["config"]
    assert seen["config"]["zero_optimization"]["stage"] == expected_stage
    assert config["optimizer"] == {"type": "AdamW"}  # the run's own config is left untouched


def test_forward_inputs_drops_what_the_teacher_does_not_take():
    teacher = DistilBertModel(DistilBertConfig(vocab_size=30, dim=8, n_layers=1, n_heads=2, hidden_dim=8))
    batch = {
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "token_type_ids": torch.zeros(1, 3, dtype=torch.long),
    }
    assert set(forward_inputs(teacher, batch)) == {"input_ids"}


def test_label_permutation():
    teacher = BertConfig(id2label={0: "a", 1: "b", 2: "c"})
    assert label_permutation(teacher, BertConfig(id2label={0: "a", 1: "b", 2: "c"})) is None
    permutation = label_permutation(teacher, BertConfig(id2label={0: "c", 1: "a", 2: "b"}))
    assert permutation.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="different names"):
        label_permutation(teacher, BertConfig(id2label={0: "a", 1: "b", 2: "x"}))
    with pytest.raises(ValueError, match="teacher has 3 labels"):
        label_permutation(teacher, BertConfig(num_labels=2))


def test_shared_vocab_size():
    assert shared_vocab_size(32000, 32000, None) == 32000
    assert shared_vocab_size(32064, 32000, 32000) == 32000
    assert shared_vocab_size(32000, 32128, 31999) == 32000
    with pytest.raises(ValueError, match="different tokenizers"):
        shared_vocab_size(50257, 32000, 50257)
    with pytest.raises(ValueError, match="pass processing_class"):
        shared_vocab_size(32064, 32000, None)
