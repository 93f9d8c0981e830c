"""create_student: shallower students initialised from tiny teachers of every supported family."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_distill.students import create_student, uniform_layer_indices

VOCAB = 120
ENCODER_DEPTH = 4  # every tiny teacher has 4 (encoder) layers ...
DECODER_DEPTH = 3  # ... and encoder-decoder teachers 3 decoder layers, so the two stacks cannot be confused


def _llama_like(config_class: type, model_class: type, **extra) -> PreTrainedModel:
    config = config_class(
        hidden_size=32,
        num_hidden_layers=ENCODER_DEPTH,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **extra,
    )
    return model_class(config)


def _seq2seq_bart_like(config_class: type, model_class: type, **extra) -> PreTrainedModel:
    config = config_class(
        d_model=32,
        encoder_layers=ENCODER_DEPTH,
        decoder_layers=DECODER_DEPTH,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        **extra,
    )
    return model_class(config)


@dataclass
class Family:
    """A tiny teacher and, written out independently of the code under test, where its layers live."""

    build: Callable[[], PreTrainedModel]
    layer_path: str  # the encoder's (or only) layer ModuleList
    depth_attribute: str  # the config field that stores its length
    decoder_layer_path: str | None = None
    decoder_depth_attribute: str | None = None
    tied: bool = True  # input and output embeddings share one Parameter


FAMILIES = {
    "bert": Family(
        lambda: BertForMaskedLM(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=ENCODER_DEPTH,
                num_attention_heads=2,
                intermediate_size=37,
                vocab_size=VOCAB,
                max_position_embeddings=64,
            )
        ),
        "bert.encoder.layer",
        "num_hidden_layers",
    ),
    "roberta": Family(
        lambda: RobertaForMaskedLM(
            RobertaConfig(
                hidden_size=32,
                num_hidden_layers=ENCODER_DEPTH,
                num_attention_heads=2,
                intermediate_size=37,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
            )
        ),
        "roberta.encoder.layer",
        "num_hidden_layers",
    ),
    "distilbert": Family(
        lambda: DistilBertForMaskedLM(
            DistilBertConfig(
                dim=32,
                n_layers=ENCODER_DEPTH,
                n_heads=2,
                hidden_dim=37,
                vocab_size=VOCAB,
                max_position_embeddings=64,
            )
        ),
        "distilbert.transformer.layer",
        "n_layers",
    ),
    "gpt2": Family(
        lambda: GPT2LMHeadModel(
            GPT2Config(
                n_embd=32,
                n_layer=ENCODER_DEPTH,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "transformer.h",
        "n_layer",
    ),
    "llama": Family(
        lambda: _llama_like(LlamaConfig, LlamaForCausalLM, tie_word_embeddings=True),
        "model.layers",
        "num_hidden_layers",
    ),
    "qwen2": Family(
        lambda: _llama_like(
            Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=3, max_window_layers=2
        ),
        "model.layers",
        "num_hidden_layers",
        tied=False,
    ),
    "mistral": Family(
        lambda: _llama_like(MistralConfig, MistralForCausalLM, sliding_window=3),
        "model.layers",
        "num_hidden_layers",
        tied=False,
    ),
    "bart": Family(
        lambda: _seq2seq_bart_like(BartConfig, BartForConditionalGeneration),
        "model.encoder.layers",
        "encoder_layers",
        "model.decoder.layers",
        "decoder_layers",
    ),
    "marian": Family(
        lambda: _seq2seq_bart_like(MarianConfig, MarianMTModel),
        "model.encoder.layers",
        "encoder_layers",
        "model.decoder.layers",
        "decoder_layers",
    ),
    "t5": Family(
        lambda: T5ForConditionalGeneration(
            T5Config(
                d_model=32,
                d_kv=16,
                d_ff=37,
                num_layers=ENCODER_DEPTH,
                num_decoder_layers=DECODER_DEPTH,
                num_heads=2,
                vocab_size=VOCAB,
                relative_attention_num_buckets=8,
            )
        ),
        "encoder.block",
        "num_layers",
        "decoder.block",
        "num_decoder_layers",
    ),
}
SEQ2SEQ = [name for name, family in FAMILIES.items() if family.decoder_layer_path]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return FAMILIES[name].build().eval()


def _logits(model: PreTrainedModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    kwargs = {"decoder_input_ids": input_ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits


def _layer_state(model: nn.Module, path: str, index: int) -> dict[str, torch.Tensor]:
    return model.get_submodule(path)[index].state_dict()


def _outside_layers(model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    paths = [family.layer_path, family.decoder_layer_path]
    return {
        key: tensor
        for key, tensor in model.state_dict().items()
        if not any(path and key.startswith(path + ".") for path in paths)
    }


def _assert_layer_copied(student: nn.Module, teacher: nn.Module, path: str, j: int, i: int) -> None:
    student_layer, teacher_layer = _layer_state(student, path, j), _layer_state(teacher, path, i)
    # T5 keeps its relative attention bias only in layer 0 (checked in its own test).
    assert set(student_layer) - set(teacher_layer) <= {"layer.0.SelfAttention.relative_attention_bias.weight"}
    for key, tensor in teacher_layer.items():
        if key in student_layer:
            assert torch.equal(student_layer[key], tensor), f"{path}.{j}.{key} != teacher {path}.{i}.{key}"


# --- structure and weights, every family ------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_student_has_teacher_class_and_config_with_fewer_layers(name: str) -> None:
    family, teacher = FAMILIES[name], _teacher(name)
    student = create_student(teacher, num_hidden_layers=2)

    assert type(student) is type(teacher)
    assert student.config is not teacher.config
    assert getattr(student.config, family.depth_attribute) == 2
    assert len(student.get_submodule(family.layer_path)) == 2
    assert getattr(teacher.config, family.depth_attribute) == ENCODER_DEPTH  # the teacher is untouched
    if family.decoder_layer_path:  # no decoder count given: the decoder keeps every layer
        assert getattr(student.config, family.decoder_depth_attribute) == DECODER_DEPTH
        assert len(student.get_submodule(family.decoder_layer_path)) == DECODER_DEPTH
    changed = {family.depth_attribute, "dtype", "layer_types", "max_window_layers"}
    teacher_rest = {k: v for k, v in teacher.config.to_dict().items() if k not in changed}
    student_rest = {k: v for k, v in student.config.to_dict().items() if k not in changed}
    assert student_rest == teacher_rest
    assert student.distilled_from_layers["layers"] == [0, 3]


@pytest.mark.parametrize("name", FAMILIES)
def test_chosen_layers_and_everything_else_are_copied(name: str) -> None:
    family, teacher = FAMILIES[name], _teacher(name)
    trainable = {key: p.requires_grad for key, p in teacher.named_parameters()}  # Marian: fixed sinusoids
    teacher.requires_grad_(False)  # a frozen teacher still gives a trainable student
    student = create_student(
        teacher, layers=[1, 3], decoder_layers=[0, 2] if family.decoder_layer_path else "uniform"
    )

    for j, i in enumerate([1, 3]):
        _assert_layer_copied(student, teacher, family.layer_path, j, i)
    if family.decoder_layer_path:
        for j, i in enumerate([0, 2]):
            _assert_layer_copied(student, teacher, family.decoder_layer_path, j, i)
    # Embeddings, final norms, heads: same names, same values.
    student_rest, teacher_rest = _outside_layers(student, family), _outside_layers(teacher, family)
    assert student_rest.keys() == teacher_rest.keys() and len(student_rest) >= 3
    for key, tensor in teacher_rest.items():
        assert torch.equal(student_rest[key], tensor), key
    # A copy, not a view: training the student must never move the teacher.
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.data_ptr() for p in student.parameters()}
    assert {key: p.requires_grad for key, p in student.named_parameters() if key in trainable} == {
        key: trainable[key] for key, _ in student.named_parameters() if key in trainable
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_full_depth_student_reproduces_teacher(name: str) -> None:
    teacher = _teacher(name)
    decoder_depth = DECODER_DEPTH if FAMILIES[name].decoder_layer_path else None
    student = create_student(
        teacher, num_hidden_layers=ENCODER_DEPTH, num_decoder_layers=decoder_depth
    ).eval()
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_shallow_student_matches_teacher_with_layers_removed_by_hand(name: str) -> None:
    """Reference: the teacher itself with its ModuleList cut down to the chosen layers."""
    family, teacher = FAMILIES[name], _teacher(name)
    student = create_student(teacher, layers=[0, 2]).eval()

    reference = copy.deepcopy(teacher)
    parent_path, _, attribute = family.layer_path.rpartition(".")
    kept = [reference.get_submodule(family.layer_path)[i] for i in (0, 2)]
    setattr(reference.get_submodule(parent_path), attribute, nn.ModuleList(kept))
    setattr(reference.config, family.depth_attribute, 2)
    torch.testing.assert_close(_logits(student), _logits(reference), rtol=0, atol=0)
    assert not torch.allclose(_logits(student), _logits(teacher))


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if family.tied])
def test_tied_weights_stay_tied(name: str) -> None:
    teacher = _teacher(name)
    assert teacher.get_input_embeddings().weight is teacher.get_output_embeddings().weight  # premise
    student = create_student(teacher, num_hidden_layers=2)
    assert (
        student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    )
    with torch.no_grad():
        student.get_input_embeddings().weight[5] += 1.0
    assert torch.equal(student.get_output_embeddings().weight[5], student.get_input_embeddings().weight[5])


def test_untied_weights_stay_untied() -> None:
    teacher = _teacher("qwen2")
    student = create_student(teacher, num_hidden_layers=2)
    assert (
        student.get_output_embeddings().weight.data_ptr() != student.get_input_embeddings().weight.data_ptr()
    )
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)


# --- layer choice -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_depth", "student_depth", "expected"),
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),  # 11/5 = 2.2 per step
        (12, 4, [0, 4, 7, 11]),  # 3.67 per step
        (24, 6, [0, 5, 9, 14, 18, 23]),  # 4.6 per step
        (6, 3, [0, 3, 5]),  # 2.5 rounds half up
        (4, 2, [0, 3]),
        (4, 1, [3]),  # a single layer: the last one
        (4, 4, [0, 1, 2, 3]),
    ],
)
def test_uniform_layer_indices_rule(teacher_depth: int, student_depth: int, expected: list[int]) -> None:
    assert uniform_layer_indices(teacher_depth, student_depth) == expected


def test_uniform_layer_indices_are_evenly_spread_for_every_depth() -> None:
    for teacher_depth in range(1, 33):
        for student_depth in range(2, teacher_depth + 1):
            indices = uniform_layer_indices(teacher_depth, student_depth)
            gaps = [b - a for a, b in zip(indices, indices[1:])]
            assert indices[0] == 0 and indices[-1] == teacher_depth - 1 and len(indices) == student_depth
            assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1, (teacher_depth, student_depth, indices)


def test_uniform_choice_is_applied_to_the_teacher() -> None:
    teacher = _teacher("bert")
    assert create_student(teacher, 3).distilled_from_layers == {"layers": [0, 2, 3]}  # 1.5 per step
    assert create_student(teacher, 1).distilled_from_layers == {"layers": [3]}
    _assert_layer_copied(create_student(teacher, 3), teacher, "bert.encoder.layer", 1, 2)


def test_explicit_indices_set_the_depth() -> None:
    teacher = _teacher("gpt2")
    student = create_student(teacher, layers=[2])
    assert student.config.n_layer == 1 and student.distilled_from_layers == {"layers": [2]}
    _assert_layer_copied(student, teacher, "transformer.h", 0, 2)
    assert create_student(teacher, 2, (1, 3)).distilled_from_layers == {"layers": [1, 3]}


def test_no_layer_choice_keeps_every_layer() -> None:
    teacher = _teacher("llama")
    student = create_student(teacher)
    assert student.config.num_hidden_layers == ENCODER_DEPTH
    torch.testing.assert_close(_logits(student.eval()), _logits(teacher), rtol=0, atol=0)


def test_per_layer_config_lists_follow_the_chosen_layers() -> None:
    teacher = _teacher("qwen2")  # layers 0-1 full attention, 2-3 sliding window
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2  # premise
    student = create_student(teacher, layers=[0, 1, 3])
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 2
    assert create_student(teacher, layers=[0, 2]).config.max_window_layers == 1


def test_student_saves_and_reloads_with_stock_transformers(tmp_path) -> None:
    teacher = _teacher("qwen2")
    student = create_student(teacher, layers=[1, 2]).eval()
    student.save_pretrained(tmp_path)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    torch.testing.assert_close(_logits(reloaded), _logits(student), rtol=0, atol=0)


# --- encoder-decoder ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_encoder_and_decoder_are_chosen_separately(name: str) -> None:
    family, teacher = FAMILIES[name], _teacher(name)
    student = create_student(teacher, num_hidden_layers=2, num_decoder_layers=1)
    assert getattr(student.config, family.depth_attribute) == 2
    assert getattr(student.config, family.decoder_depth_attribute) == 1
    assert len(student.get_submodule(family.layer_path)) == 2
    assert len(student.get_submodule(family.decoder_layer_path)) == 1
    assert student.distilled_from_layers == {"layers": [0, 3], "decoder_layers": [2]}
    _assert_layer_copied(student, teacher, family.decoder_layer_path, 0, 2)

    only_decoder = create_student(teacher, decoder_layers=[0, 2])
    assert getattr(only_decoder.config, family.depth_attribute) == ENCODER_DEPTH
    assert getattr(only_decoder.config, family.decoder_depth_attribute) == 2
    assert only_decoder.distilled_from_layers == {"layers": [0, 1, 2, 3], "decoder_layers": [0, 2]}
    assert _logits(student.eval()).shape == _logits(teacher).shape


def test_t5_student_first_layer_gets_relative_attention_bias() -> None:
    teacher = _teacher("t5")
    student = create_student(teacher, layers=[1, 3], decoder_layers=[2])
    bias_key = "layer.0.SelfAttention.relative_attention_bias.weight"
    for stack in ("encoder.block", "decoder.block"):
        student_first = _layer_state(student, stack, 0)
        assert bias_key in student_first
        assert torch.equal(student_first[bias_key], _layer_state(teacher, stack, 0)[bias_key])
        assert bias_key not in _layer_state(teacher, stack, 1)  # premise: only layer 0 has it
    assert bias_key not in _layer_state(student, "encoder.block", 1)


def test_generation_config_is_copied() -> None:
    teacher = _teacher("marian")
    teacher.generation_config.num_beams = 3
    teacher.generation_config.max_length = 17
    student = create_student(teacher, 2, num_decoder_layers=1)
    assert student.generation_config.num_beams == 3 and student.generation_config.max_length == 17
    assert student.generation_config is not teacher.generation_config


# --- heads, dtype -------------------------------------------------------------------------------------------


def test_sequence_classification_teacher_keeps_labels_and_classifier() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=ENCODER_DEPTH,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
        problem_type="single_label_classification",
    )
    teacher = BertForSequenceClassification(config).eval()
    student = create_student(teacher, num_hidden_layers=2)
    assert student.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert student.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert student.config.num_labels == 3 and student.config.problem_type == "single_label_classification"
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)


@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
def test_bf16_teacher_gives_bf16_student(name: str) -> None:
    teacher = _teacher(name).to(torch.bfloat16)
    decoder_depth = DECODER_DEPTH if FAMILIES[name].decoder_layer_path else None
    student = create_student(teacher, ENCODER_DEPTH, num_decoder_layers=decoder_depth).eval()
    assert student.dtype == torch.bfloat16
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert student.device == teacher.device
    torch.testing.assert_close(_logits(student), _logits(teacher), rtol=0, atol=0)


def test_mixed_dtype_teacher_keeps_each_tensor_dtype() -> None:
    teacher = _teacher("t5").to(torch.float16)
    for block in teacher.encoder.block:  # what from_pretrained does with T5's _keep_in_fp32_modules
        block.layer[-1].DenseReluDense.wo.float()
    student = create_student(teacher, 2, num_decoder_layers=1)
    assert student.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float32
    assert student.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    assert student.decoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype == torch.float16


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_hidden_layers": 0}, r"num_hidden_layers=0 .*4 layers.*from 1 to 4"),
        ({"num_hidden_layers": 5}, r"num_hidden_layers=5 .*from 1 to 4"),
        ({"num_hidden_layers": 2.0}, r"num_hidden_layers=2\.0 .*integer"),
        ({"layers": [0, 4]}, r"layers contains 4.*\[0, 3\]"),
        ({"layers": [-1, 2]}, r"layers contains -1.*\[0, 3\]"),
        ({"layers": [1, 1, 2]}, r"repeats \[1\].*unique"),
        ({"layers": []}, r"layers is empty"),
        (
            {"num_hidden_layers": 3, "layers": [0, 3]},
            r"num_hidden_layers=3 but layers lists 2.*num_hidden_layers=2",
        ),
        ({"num_hidden_layers": 2, "layers": "first"}, r"layers='first' is not supported.*'uniform'"),
        ({"num_decoder_layers": 1}, r"only to encoder-decoder models.*BertForMaskedLM"),
        ({"decoder_layers": [0]}, r"only to encoder-decoder models"),
    ],
)
def test_bad_layer_choice_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_student(_teacher("bert"), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_decoder_layers": 4}, r"num_decoder_layers=4 .*3 decoder layers.*from 1 to 3"),
        ({"decoder_layers": [0, 3]}, r"decoder_layers contains 3.*\[0, 2\]"),
        ({"num_hidden_layers": 2, "decoder_layers": [2, 2]}, r"decoder_layers=\[2, 2\] repeats \[2\]"),
    ],
)
def test_bad_decoder_layer_choice_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_student(_teacher("bart"), **kwargs)


def test_peft_teacher_must_be_merged_first() -> None:
    from peft import LoraConfig, get_peft_model

    teacher = get_peft_model(_teacher("bert"), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"PEFT adapters.*merge_and_unload"):
        create_student(teacher, 2)
    merged = teacher.merge_and_unload()
    assert type(create_student(merged, 2)) is BertForMaskedLM


class _PairConfig(PretrainedConfig):
    model_type = "hf_distill_test_pair"

    def __init__(self, num_hidden_layers: int = 2, **kwargs) -> None:
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class _PairModel(PreTrainedModel):
    """Layers kept as two attributes, not an nn.ModuleList: nothing for create_student to slice."""

    config_class = _PairConfig

    def __init__(self, config: _PairConfig) -> None:
        super().__init__(config)
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)
        self.post_init()


def test_unsupported_architecture_names_class_and_families() -> None:
    with pytest.raises(ValueError, match=r"does not support _PairModel.*ModuleList of 2 layers.*BERT.*T5"):
        create_student(_PairModel(_PairConfig()), 1)


def test_non_model_teacher_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"PreTrainedModel, got Linear"):
        create_student(nn.Linear(2, 2), 1)
