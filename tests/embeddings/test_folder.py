"""The sentence-transformers folder format against sentence-transformers itself: a teacher folder it wrote gives our
pooled embeddings equal to its `encode`; a student we write loads in `SentenceTransformer` with the embeddings of our
own pooling, and in plain transformers; a folder without pooling information is refused, naming the flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from embedding_helpers import TEXTS, st_teacher_folder
from transformers import AutoModel

from hf_distill.embeddings import embedding_student, load_sentence_embedder, save_sentence_embedder


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize(
    "options",
    [{"pooling": "mean", "normalize": True}, {"pooling": "cls", "normalize": False, "dense_out": 16}],
)
def test_our_pooled_embeddings_equal_sentence_transformers_encode(tmp_path, options):
    folder = st_teacher_folder(tmp_path, **options)
    model, tokenizer = load_sentence_embedder(folder)
    ours = model.encode(TEXTS, tokenizer, batch_size=5).numpy()
    theirs = _st(folder).encode(TEXTS, batch_size=7, convert_to_numpy=True)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert model.normalize is options["normalize"] and model.pooling == options["pooling"]


def test_a_folder_without_pooling_information_is_refused_with_the_flag(tmp_path):
    folder = st_teacher_folder(tmp_path)
    plain = tmp_path / "plain"
    AutoModel.from_pretrained(folder).save_pretrained(plain)  # a transformers model: no modules.json
    with pytest.raises(ValueError, match="--pooling"):
        load_sentence_embedder(plain)
    model, _ = load_sentence_embedder(plain, pooling="mean", normalize=True)
    assert model.pooling == "mean" and model.normalize


@pytest.mark.parametrize("shape", [{"num_layers": 1}, {"hidden": 16, "num_layers": 1}])
def test_a_saved_student_loads_in_sentence_transformers_and_transformers(tmp_path, shape):
    from sentence_transformers import SentenceTransformer

    teacher, tokenizer = load_sentence_embedder(st_teacher_folder(tmp_path))
    calibration = [dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))]
    student = embedding_student(teacher, calibration=calibration, **shape)
    torch.manual_seed(0)
    if len(student.dense_layers):
        torch.nn.init.normal_(student.dense_layers[0].linear.weight)  # weights the test can see
    path = save_sentence_embedder(student, tokenizer, tmp_path / "student", card="# a card\n")
    ours = student.encode(TEXTS, tokenizer).numpy()
    loaded = SentenceTransformer(str(path), device="cpu")
    theirs = loaded.encode(TEXTS, convert_to_numpy=True)
    assert theirs.shape == (len(TEXTS), teacher.embedding_dimension)  # the teacher's space
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-4)
    # plain transformers: the encoder, whose mean-pooled last hidden state is the student's before projection
    encoder = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        expected = student.encoder(**batch).last_hidden_state
    assert torch.allclose(hidden, expected, atol=1e-6)
    modules = json.loads((path / "modules.json").read_text())
    kinds = [entry["type"].rsplit(".", 1)[-1] for entry in modules]
    assert kinds == ["Transformer", "Pooling", *(["Dense"] if "hidden" in shape else []), "Normalize"]
    assert (path / "README.md").read_text() == "# a card\n"


def test_a_student_keeps_the_teachers_pooling_and_dense_layers(tmp_path):
    teacher, tokenizer = load_sentence_embedder(st_teacher_folder(tmp_path, pooling="max", dense_out=8))
    student = embedding_student(teacher, num_layers=1)
    assert student.pooling == "max" and student.embedding_dimension == 8
    assert torch.equal(student.dense_layers[0].linear.weight, teacher.dense_layers[0].linear.weight)
    path = save_sentence_embedder(student, tokenizer, tmp_path / "student")
    reloaded, _ = load_sentence_embedder(path)
    np.testing.assert_allclose(
        reloaded.encode(TEXTS, tokenizer).numpy(), student.encode(TEXTS, tokenizer).numpy(), atol=1e-6
    )
