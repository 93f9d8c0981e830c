"""Transfer sets, augmentation and several teachers in the classification recipe (tiny models, files in tmp_path)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_classification import _rows, _save_teacher, _training_flags, _write, distill_glue

transfer = distill_glue.transfer
augmentation = distill_glue.augmentation


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path):
    return {
        "train": _write(tmp_path / "train.csv", _rows(24, seed=1)),
        "validation": _write(tmp_path / "validation.csv", _rows(12, seed=2)),
    }


def _unlabelled(tmp_path, name="transfer.txt", n=20):
    path = tmp_path / name
    path.write_text("\n".join(row["text"] for row in _rows(n, seed=3)) + "\n\n")
    return str(path)


# ---- the transfer file -------------------------------------------------------------------------------------


def test_transfer_texts_load_from_text_and_tables(tmp_path):
    texts = transfer.load_transfer_texts(_unlabelled(tmp_path), ("text",), "label")
    assert len(texts) == 20 and texts.column_names == ["text"]  # the blank line is dropped
    table = _write(
        tmp_path / "unlabelled.jsonl", [{"text": row["text"], "id": i} for i, row in enumerate(_rows(5, 4))]
    )
    assert transfer.load_transfer_texts(table, ("text",), "label").column_names == ["text"]


def test_transfer_files_with_labels_or_unknown_formats_raise(tmp_path):
    labelled = _write(tmp_path / "labelled.csv", _rows(5, seed=4))
    with pytest.raises(ValueError, match="label column 'label' with values"):
        transfer.load_transfer_texts(labelled, ("text",), "label")
    with pytest.raises(ValueError, match="unknown format '.xml'"):
        transfer.TransferArguments(transfer_file=str(tmp_path / "data.xml"))
    with pytest.raises(ValueError, match="lacks the text column"):
        transfer.load_transfer_texts(labelled, ("sentence",), "other")
    with pytest.raises(ValueError, match="two text columns"):
        transfer.load_transfer_texts(_unlabelled(tmp_path), ("a", "b"), "label")


def test_unlabelled_rows_are_mixed_in_with_label_minus_100(tmp_path):
    from datasets import Dataset

    train = Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [0, 1]})
    extra = transfer.unlabelled(Dataset.from_dict({"input_ids": [[4], [5, 6], [7]]}))
    mixed = transfer.mixed_training_set(train, [extra], seed=0)
    assert sorted(mixed["labels"]) == [-100, -100, -100, 0, 1]


# ---- augmentation ------------------------------------------------------------------------------------------


def test_neighbours_are_the_nearest_candidates_by_cosine(bert_tokenizer):
    torch.manual_seed(0)
    embeddings = torch.randn(len(bert_tokenizer), 8)
    candidates = augmentation.candidate_tokens(bert_tokenizer)
    assert not candidates[bert_tokenizer.all_special_ids].any()
    ids = [bert_tokenizer.convert_tokens_to_ids(word) for word in ("movie", "good", "cat")]
    table = augmentation.nearest_neighbours(embeddings, ids, candidates, k=3)
    unit = F.normalize(embeddings.double(), dim=-1)
    for token_id in ids:
        similarity = unit @ unit[token_id]
        similarity[~candidates] = -2.0
        similarity[token_id] = -2.0
        assert table[token_id] == similarity.topk(3).indices.tolist()


def test_augmentation_replaces_words_by_neighbours_and_is_reused(tmp_path, bert_tokenizer):
    torch.manual_seed(0)
    embeddings = torch.randn(len(bert_tokenizer), 8)
    rows = [{"text": "the movie was good"}, {"text": "a very happy story"}]
    options = dict(copies=3, replace_prob=1.0, neighbours=2, max_tokens=32, seed=0)
    path = augmentation.augmented_file(
        rows, ("text",), bert_tokenizer, embeddings, tmp_path / "aug", **options
    )
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(lines) == 6
    candidates = augmentation.candidate_tokens(bert_tokenizer)
    for source_index, row in enumerate(rows):
        source = bert_tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        table = augmentation.nearest_neighbours(embeddings, source, candidates, k=2)
        for line in lines[source_index * 3 : source_index * 3 + 3]:
            new = bert_tokenizer(line, add_special_tokens=False)["input_ids"]
            assert len(new) == len(source)
            for old_id, new_id in zip(source, new):
                assert new_id in table[old_id] if candidates[old_id] else new_id == old_id
    manifest = json.loads((tmp_path / "aug" / "manifest.json").read_text())
    assert manifest["rows"] == 6 and manifest["settings"]["copies"] == 3
    stamp = path.stat().st_mtime_ns
    again = augmentation.augmented_file(
        rows, ("text",), bert_tokenizer, embeddings, tmp_path / "aug", **options
    )
    assert again.stat().st_mtime_ns == stamp  # reused, not rewritten
    options["copies"] = 1
    augmentation.augmented_file(rows, ("text",), bert_tokenizer, embeddings, tmp_path / "aug", **options)
    assert len(path.read_text().splitlines()) == 2  # other settings: written again


# ---- the recipe --------------------------------------------------------------------------------------------


def test_recipe_with_two_teachers_a_transfer_file_and_augmentation(tmp_path, bert_tokenizer, data):
    first = _save_teacher(tmp_path / "t1", bert_tokenizer, layers=2)
    second = _save_teacher(tmp_path / "t2", bert_tokenizer, layers=3)
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--teacher_model_name_or_path", first, second, "--teacher_weights", "1", "3",
         "--student_num_layers", "1", "--train_file", data["train"], "--validation_file", data["validation"],
         "--transfer_file", _unlabelled(tmp_path), "--augment_copies", "2", "--do_train", "--do_eval",
         "--compare_no_kd"] + _training_flags(output)
    )  # fmt: skip
    assert 0.0 <= results["eval"]["eval_accuracy"] <= 1.0
    assert (output / "augmented" / "manifest.json").is_file()
    assert json.loads((output / "augmented" / "manifest.json").read_text())["rows"] == 48


def test_recipe_errors_before_training(tmp_path, bert_tokenizer, data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as building the trainer")

    monkeypatch.setattr(distill_glue, "DistillationTrainer", refuse)
    first = _save_teacher(tmp_path / "t1", bert_tokenizer, layers=2)
    second = _save_teacher(tmp_path / "t2", bert_tokenizer, layers=2, num_labels=3)
    base = ["--student_num_layers", "1", "--train_file", data["train"], "--validation_file", data["validation"],
            "--do_train"] + _training_flags(tmp_path / "out")  # fmt: skip
    with pytest.raises(ValueError, match="labels"):
        distill_glue.main(["--teacher_model_name_or_path", first, second] + base)
    with pytest.raises(ValueError, match="3 values for 1 teacher"):
        distill_glue.main(["--teacher_model_name_or_path", first, "--teacher_weights", "1", "2", "3"] + base)
    with pytest.raises(ValueError, match="label column"):
        distill_glue.main(["--teacher_model_name_or_path", first, "--transfer_file", data["train"]] + base)
