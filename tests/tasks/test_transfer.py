"""Transfer sets, augmentation (embedding neighbours and a masked LM), unlabelled rows and splits of the dataset,
and several teachers in the classification recipe (tiny models, files in tmp_path)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from test_classification import _rows, _save_teacher, _training_flags, _write, distill_glue, glue_recipe
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

transfer = glue_recipe.transfer
augmentation = glue_recipe.augmentation


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

    monkeypatch.setattr(glue_recipe, "DistillationTrainer", refuse)
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


# ---- augmentation with a masked LM -------------------------------------------------------------------------


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer: the test words plus '##s', so 'films' is two pieces and 'zebra' unknown."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(specials + WORDS + ["##s"]))}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def _save_masked_lm(path, first="great", second="fun") -> str:
    """A tiny BertForMaskedLM whose output bias makes `first` the top prediction everywhere and `second` the next
    (so a masked `first` becomes `second`), saved with its own tokenizer."""
    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    model = BertForMaskedLM(config)
    with torch.no_grad():
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids(first)] = 1e4
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids(second)] = 5e3
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _expected_top1(text: str) -> str:
    """What the biased MLM makes of a text of test words with top_k=1 and replace_prob=1: every whole word of two
    letters or more becomes 'great', 'great' itself becomes 'fun'; anything else stays."""
    return " ".join(
        "fun" if word == "great" else "great" if len(word) >= 2 else word for word in text.split()
    )


def test_masked_lm_replaces_single_piece_words_with_its_prediction(tmp_path):
    model, tokenizer = augmentation.load_masked_lm(_save_masked_lm(tmp_path / "mlm"))
    replacer = augmentation.MaskedLMPredictions(model, tokenizer, top_k=1)
    texts = ["The movie was GREAT!", "good films about a zebra"]
    got = replacer.augment(texts, copies=2, replace_prob=1.0, max_tokens=32, seed=0)
    # Case and punctuation outside the replaced words stay; 'films' (two pieces), 'about' and 'zebra' (unknown to
    # the MLM) and 'a' (one letter) are kept.
    assert got == ["great great great fun!"] * 2 + ["great films about a zebra"] * 2
    cut = replacer.augment(texts, copies=1, replace_prob=1.0, max_tokens=2, seed=0)
    # The first two tokens of each text, as the models would see them; "films" lost a piece and is not replaced.
    assert cut == ["great great", "great film"]
    kept = replacer.augment(texts, copies=1, replace_prob=1e-9, max_tokens=32, seed=0)
    assert kept == texts


def test_masked_lm_candidates_are_its_top_k_whole_words(tmp_path):
    model, tokenizer = augmentation.load_masked_lm(_save_masked_lm(tmp_path / "mlm"))
    replacer = augmentation.MaskedLMPredictions(model, tokenizer, top_k=3)
    got = replacer.augment(["the movie"], copies=40, replace_prob=1.0, max_tokens=32, seed=1)
    # The reference: the MLM's scores at each masked word, over the whole-word tokens other than the word itself.
    candidates = augmentation.candidate_tokens(tokenizer)
    ids = tokenizer("the movie")["input_ids"]
    allowed = []
    for position in (1, 2):
        masked = torch.tensor([ids])
        masked[0, position] = tokenizer.mask_token_id
        with torch.no_grad():
            scores = model(input_ids=masked).logits[0, position].double()
        scores[~candidates[: len(scores)]] = float("-inf")
        scores[ids[position]] = float("-inf")
        allowed.append(set(tokenizer.convert_ids_to_tokens(scores.topk(3).indices.tolist())))
    seen = [set(), set()]
    for line in got:
        words = line.split()
        assert len(words) == 2
        for index, word in enumerate(words):
            assert word in allowed[index]
            seen[index].add(word)
    assert seen == allowed  # uniform over the three: 40 draws see each


def test_masked_lm_file_is_reused_and_rebuilt_when_settings_change(tmp_path):
    model, tokenizer = augmentation.load_masked_lm(_save_masked_lm(tmp_path / "mlm"))
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    rows = [{"text": "the movie was good"}, {"text": "i love this film"}]
    options = dict(copies=2, replace_prob=1.0, max_tokens=32, seed=0)

    def write(top_k=1):
        replacer = augmentation.MaskedLMPredictions(model, tokenizer, top_k=top_k)
        return augmentation.write_augmented(rows, ("text",), replacer, tmp_path / "aug", **options)

    path = write()
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert lines == [_expected_top1(row["text"]) for row in rows for _ in range(2)]
    manifest = json.loads((tmp_path / "aug" / "manifest.json").read_text())
    assert manifest["method"] == "masked_lm" and manifest["settings"]["top_k"] == 1 and manifest["rows"] == 4
    calls, stamp = len(forwards), path.stat().st_mtime_ns
    assert calls > 0
    assert (
        write() == path and len(forwards) == calls and path.stat().st_mtime_ns == stamp
    )  # reused: no MLM run
    write(top_k=2)
    assert len(forwards) > calls  # another setting: the MLM runs again
    assert json.loads((tmp_path / "aug" / "manifest.json").read_text())["settings"]["top_k"] == 2
    calls = len(forwards)
    with torch.no_grad():
        model.cls.predictions.bias[tokenizer.convert_tokens_to_ids("sad")] = 2e4
    path = write(top_k=2)
    assert len(forwards) > calls  # other weights: rebuilt too
    lines = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert any("sad" in line for line in lines)  # the new top prediction


def test_a_model_without_a_masked_lm_head_is_refused(tmp_path):
    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
    )
    BertModel(config).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"no trained masked-LM head.*bert-base-uncased"):
        augmentation.load_masked_lm(str(tmp_path / "encoder"))
    with pytest.raises(ValueError, match="augment_copies is 0"):
        transfer.TransferArguments(augment_model_name_or_path=str(tmp_path / "encoder"))


def test_recipe_augments_with_a_masked_lm(tmp_path, bert_tokenizer, data):
    teacher = _save_teacher(tmp_path / "teacher", bert_tokenizer, layers=2)
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", data["train"],
         "--validation_file", data["validation"], "--augment_copies", "1", "--augment_replace_prob", "1.0",
         "--augment_neighbours", "1", "--augment_model_name_or_path", _save_masked_lm(tmp_path / "mlm"),
         "--do_train"] + _training_flags(output)
    )  # fmt: skip
    lines = [
        json.loads(line)["text"]
        for line in (output / "augmented" / "augmented.jsonl").read_text().splitlines()
    ]
    assert lines == [_expected_top1(row["text"]) for row in _rows(24, seed=1)]
    assert json.loads((output / "augmented" / "manifest.json").read_text())["method"] == "masked_lm"
    assert (
        results["train"]["train_labelled_samples"] == 24 and results["train"]["train_kd_only_samples"] == 24
    )


# ---- unlabelled rows and splits of the dataset -------------------------------------------------------------


def _blank_labels(rows: list[dict], every: int = 4) -> list[dict]:
    return [{**row, "label": "" if index % every == 0 else row["label"]} for index, row in enumerate(rows)]


def test_training_rows_without_a_label_are_kd_only_with_the_flag(tmp_path, bert_tokenizer, data, monkeypatch):
    rows = _blank_labels(_rows(24, seed=1))
    train = _write(tmp_path / "partly_labelled.csv", rows)
    teacher = _save_teacher(
        tmp_path / "teacher",
        bert_tokenizer,
        layers=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base = ["--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
            "--validation_file", data["validation"], "--do_train"]  # fmt: skip
    with pytest.raises(ValueError, match=r"6 of 24 training rows have no label.*--use_unlabelled_rows"):
        distill_glue.main(base + _training_flags(tmp_path / "refused"))

    trainers = []

    class Recording(glue_recipe.DistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(glue_recipe, "DistillationTrainer", Recording)
    output = tmp_path / "out"
    results = distill_glue.main(base + ["--use_unlabelled_rows"] + _training_flags(output))
    assert results["train"]["train_labelled_samples"] == 18 and results["train"]["train_kd_only_samples"] == 6
    saved = json.loads((output / "train_results.json").read_text())
    assert saved["train_labelled_samples"] == 18 and saved["train_kd_only_samples"] == 6

    trainer = trainers[0]
    dataset = trainer.train_dataset
    texts = [bert_tokenizer.decode(ids, skip_special_tokens=True) for ids in dataset["input_ids"]]
    unlabelled = sorted(text for text, label in zip(texts, dataset["labels"]) if label == -100)
    assert unlabelled == sorted(row["text"] for row in rows if row["label"] == "")
    id2label = trainer.model.config.id2label
    by_text = {row["text"]: row["label"] for row in rows}
    for text, label in zip(texts, dataset["labels"]):
        assert label == -100 or id2label[label] == by_text[text]

    # The hard loss of a collated batch mixing both kinds: the cross-entropy over the labelled rows alone.
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    assert int(batch["labels"].eq(-100).sum()) == 6
    trainer.args.alpha = 0.0  # the task term alone
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits.double()
    labelled = batch["labels"].ne(-100)
    expected = F.cross_entropy(logits[labelled], batch["labels"][labelled])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_missing_labels_in_csv_json_and_class_labels():
    flags = transfer.TransferArguments(use_unlabelled_rows=True)
    # An integer CSV column with empty cells arrives as floats with NaN: set aside, the rest is integers again.
    floats = DatasetDict(
        train=Dataset.from_dict({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]})
    )
    assert floats["train"].features["label"].dtype == "float64"
    raw, sources = transfer.set_aside_kd_only_rows(floats, "label", flags)
    assert raw["train"]["label"] == [1, 0] and raw["train"].features["label"].dtype == "int64"
    assert sources["unlabelled training rows"]["text"] == ["b"]
    # JSON nulls and blank strings; -1 of a ClassLabel is unlabelled, a plain -1 is a class.
    strings = DatasetDict(
        train=Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["x", None, " ", "y"]})
    )
    assert transfer.set_aside_kd_only_rows(strings, "label", flags)[1]["unlabelled training rows"][
        "text"
    ] == [
        "b",
        "c",
    ]
    classes = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    glue = DatasetDict(train=Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}, features=classes))
    assert transfer.set_aside_kd_only_rows(glue, "label", flags)[1]["unlabelled training rows"]["text"] == [
        "b"
    ]
    plain = DatasetDict(train=Dataset.from_dict({"text": ["a", "b"], "label": [1, -1]}))
    raw, sources = transfer.set_aside_kd_only_rows(plain, "label", flags)
    assert sources == {} and raw["train"]["label"] == [1, -1]
    # --max_train_samples counts every row, labelled or not.
    raw, sources = transfer.set_aside_kd_only_rows(strings, "label", flags, max_train_samples=2)
    assert raw["train"]["text"] == ["a"] and sources["unlabelled training rows"]["text"] == ["b"]
    # Evaluation data with some rows unlabelled fails (a test split with none labelled is prediction data).
    partly = DatasetDict(
        train=Dataset.from_dict({"text": ["a"], "label": ["x"]}),
        validation=Dataset.from_dict({"text": ["a", "b"], "label": ["x", None]}),
    )
    with pytest.raises(ValueError, match="1 of 2 rows of the validation data have no label"):
        transfer.set_aside_kd_only_rows(partly, "label", flags)


def _fake_imdb(seed: int) -> DatasetDict:
    """IMDB's layout: text/label (ClassLabel neg/pos) in train and test, and an 'unsupervised' split labelled -1."""
    rng = random.Random(seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

    def split(n: int, labelled: bool = True) -> Dataset:
        rows = _rows(n, seed=rng.randrange(1000))
        labels = [int(row["label"] == "pos") if labelled else -1 for row in rows]
        return Dataset.from_dict({"text": [row["text"] for row in rows], "label": labels}, features=features)

    return DatasetDict(train=split(24), test=split(12), unsupervised=split(10, labelled=False))


def test_transfer_split_of_a_hub_dataset(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setattr(
        glue_recipe.common.loading.datasets, "load_dataset", lambda *args, **kwargs: _fake_imdb(seed=5)
    )
    teacher = _save_teacher(tmp_path / "teacher", bert_tokenizer, layers=2)
    base = ["--dataset_name", "imdb", "--teacher_model_name_or_path", teacher, "--student_num_layers", "1",
            "--do_train", "--do_predict"]  # fmt: skip
    results = distill_glue.main(
        base + ["--transfer_split", "unsupervised"] + _training_flags(tmp_path / "out")
    )
    assert (
        results["train"]["train_labelled_samples"] == 24 and results["train"]["train_kd_only_samples"] == 10
    )
    assert 0.0 <= results["predict"]["test_accuracy"] <= 1.0

    with pytest.raises(ValueError, match=r"'extra' is not a split.*\['train', 'test', 'unsupervised'\]"):
        distill_glue.main(base + ["--transfer_split", "extra"] + _training_flags(tmp_path / "missing"))
    with pytest.raises(ValueError, match="'test' has labels"):
        distill_glue.main(base + ["--transfer_split", "test"] + _training_flags(tmp_path / "labelled"))
    with pytest.raises(ValueError, match="'train' is the labelled training split"):
        transfer.TransferArguments(transfer_split="train")
