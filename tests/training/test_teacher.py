"""teacher.py: freezing, placement, sharded preparation (with fakes standing in for FSDP/DeepSpeed), alignment."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertModel

from hf_distill.training.teacher import forward_inputs, label_permutation, prepare_teacher, shared_vocab_size


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
        self.num_processes = 1
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


class _Vocab:
    """A stand-in tokenizer: just the token -> id map."""

    def __init__(self, tokens):
        self.vocab = {token: i for i, token in enumerate(tokens)}

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)


def test_shared_vocab_size():
    words = _Vocab([f"w{i}" for i in range(100)])
    assert shared_vocab_size(128, 100, words, words) == 100  # padded teacher, one tokenizer
    assert shared_vocab_size(100, 128, words, _Vocab([f"w{i}" for i in range(100)])) == 100
    with pytest.raises(ValueError, match="pass teacher_processing_class"):
        shared_vocab_size(128, 100, words, None)
    with pytest.raises(ValueError, match="pass processing_class"):
        shared_vocab_size(128, 100, None, words)
    # a 50,257-token teacher tokenizer is not padding of a 100-token one
    with pytest.raises(ValueError, match="teacher's tokenizer has 50257 tokens"):
        shared_vocab_size(50257, 100, words, _Vocab([f"g{i}" for i in range(50257)]))
    # same sizes, different ids
    with pytest.raises(ValueError, match="different ids"):
        shared_vocab_size(128, 100, words, _Vocab([f"w{i}" for i in reversed(range(100))]))


def test_teacher_deepspeed_config_is_complete_without_the_trainers_auto_values():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_distill.training.teacher import teacher_deepspeed_config

    teacher = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    ).to(torch.bfloat16)
    run_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR"},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "offload_param": {"device": "none", "pin_memory": "auto"},
        },
    }
    config = teacher_deepspeed_config(run_config, teacher, micro_batch_size=4, world_size=2)

    def autos(node):
        if isinstance(node, dict):
            return [key for key, value in node.items() if value == "auto"] + sum(
                map(autos, node.values()), []
            )
        return []

    assert autos(config) == []
    assert "optimizer" not in config and "scheduler" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 48 * 48  # from the teacher's hidden size, as transformers does
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 48 * 48)
    assert zero["stage3_param_persistence_threshold"] == 480
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 8)
    assert (
        run_config["zero_optimization"]["reduce_bucket_size"] == "auto"
    )  # the run's own config is untouched
    stage2 = teacher_deepspeed_config(
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
        teacher,
        micro_batch_size=1,
        world_size=1,
    )
    assert stage2["zero_optimization"] == {"stage": 0}


def test_full_output_layer_on_one_device_is_the_head_itself():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_distill.training.teacher import full_output_layer

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with full_output_layer(model, accelerator=None, vocab_size=40) as (weight, bias):
        assert weight.data_ptr() == model.lm_head.weight.data_ptr() and weight.shape == (40, 16)
        assert bias is None
