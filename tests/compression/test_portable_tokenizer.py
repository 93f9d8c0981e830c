"""Vocabulary-pruned folders load with the standard loaders of transformers 5 here, and name a tokenizer class that
transformers 4 has too (benchmarks/check_transformers4.sh loads them in a real transformers-4 environment).

References: the folder's own tokenizer_config.json as written by save_pretrained, AutoTokenizer, transformers'
`pipeline`, and the model's logits computed in the test."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from conftest import TEXTS_FOR_TESTS
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_distill.compression.pruning import prune_vocabulary, tokens_used
from hf_distill.compression.pruning.portable_tokenizer import make_tokenizer_folder_portable

LABELS = ["neg", "pos"]


def _classifier(tokenizer) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def pruned_folder(tmp_path, bert_tokenizer):
    model = _classifier(bert_tokenizer)
    keep = tokens_used(bert_tokenizer, TEXTS_FOR_TESTS)
    pruned_model, pruned_tokenizer = prune_vocabulary(model, bert_tokenizer, keep)
    folder = tmp_path / "pruned"
    pruned_model.save_pretrained(folder)
    pruned_tokenizer.save_pretrained(folder)
    return folder, pruned_model.eval(), pruned_tokenizer


def test_pruned_tokenizer_folder_names_a_class_both_transformers_lines_load(pruned_folder):
    folder, _, pruned_tokenizer = pruned_folder
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # TokenizersBackend does not exist in 4.x
    loaded = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS_FOR_TESTS:
        assert loaded(text).input_ids == pruned_tokenizer(text).input_ids
    pair = loaded(TEXTS_FOR_TESTS[:3], TEXTS_FOR_TESTS[3:6], padding=True)
    expected = pruned_tokenizer(TEXTS_FOR_TESTS[:3], TEXTS_FOR_TESTS[3:6], padding=True)
    assert pair.input_ids == expected.input_ids and pair.token_type_ids == expected.token_type_ids
    # datasets.map with several processes pickles the tokenizer; it must come back as the same tokenizer.
    copied = pickle.loads(pickle.dumps(pruned_tokenizer))
    assert copied(TEXTS_FOR_TESTS[0]).input_ids == pruned_tokenizer(TEXTS_FOR_TESTS[0]).input_ids


def test_pipeline_runs_on_a_pruned_classifier_folder(pruned_folder):
    folder, model, tokenizer = pruned_folder
    classify = transformers.pipeline("text-classification", model=str(folder), device="cpu", top_k=None)
    texts = TEXTS_FOR_TESTS[:4]
    results = classify(texts)
    with torch.no_grad():
        probabilities = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for result, expected in zip(results, probabilities):
        scores = {entry["label"]: entry["score"] for entry in result}
        assert scores.keys() == set(LABELS)
        for index, label in enumerate(LABELS):
            assert scores[label] == pytest.approx(expected[index].item(), abs=1e-5)


def test_a_resaved_tokenizer_folder_is_made_portable(pruned_folder, tmp_path):
    """A pruned folder reloaded and saved again (as every later compression stage does) is written by transformers 5
    as a TokenizersBackend; make_tokenizer_folder_portable renames only the class."""
    folder, _, pruned_tokenizer = pruned_folder
    resaved = tmp_path / "resaved"
    AutoTokenizer.from_pretrained(folder).save_pretrained(resaved)
    before = json.loads((resaved / "tokenizer_config.json").read_text())
    assert before["tokenizer_class"] == "TokenizersBackend"  # the defect this guards against
    assert make_tokenizer_folder_portable(resaved)
    after = json.loads((resaved / "tokenizer_config.json").read_text())
    assert after == {**before, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert not make_tokenizer_folder_portable(resaved)  # already portable: nothing to do
    assert AutoTokenizer.from_pretrained(resaved)(TEXTS_FOR_TESTS[0]).input_ids == (
        pruned_tokenizer(TEXTS_FOR_TESTS[0]).input_ids
    )
    assert not make_tokenizer_folder_portable(tmp_path / "no_such_folder")
