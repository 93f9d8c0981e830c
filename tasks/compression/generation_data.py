"""The data of a generation recipe: texts (causal LM) or sentence pairs (translation) per split, the tokenizer the
recipe trains for a teacher it trains itself, training blocks, held-out text and the fixed prompts every stage is
timed on.

Held-out quality is measured on the same text for every stage, whatever its tokenizer: perplexity is
exp(total negative log-likelihood of the held-out chunks / the teacher's token count of them), which is the usual
perplexity when a stage shares the teacher's tokenizer and stays comparable when vocabulary pruning changed it.
The prompts are the teacher's token ids (the first `prompt_tokens` tokens of test articles); a stage with its own
vocabulary reads the same tokens under its own ids (`ids_for`), which vocabulary pruning guarantees by keeping
every prompt token.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hf_distill.compression.generation_recipe import CAUSAL_LM, GenerationRecipe
from hf_distill.storage.atomic import atomic_directory

SPLITS = ("train", "validation", "test")


@dataclass
class GenerationData:
    """Everything the stages and the report read. `tokenizer_dir`: the teacher's tokenizer."""

    task: str
    texts: dict[str, list[str]] = field(default_factory=dict)  # causal_lm
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # translation
    tokenizer_dir: Path | None = None
    block_size: int = 128
    max_train_blocks: int | None = None
    eval_blocks: int = 64
    calibration_blocks: int = 32
    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    measure_memory: bool = True

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _load_tokenizer(self.tokenizer_dir)

    def train_blocks(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        from hf_distill.tasks.lm.data import pack_into_blocks

        ids = tokenizer(self.texts["train"], add_special_tokens=False, verbose=False)["input_ids"]
        blocks = pack_into_blocks([row + [tokenizer.eos_token_id] for row in ids], self.block_size)
        return blocks[: self.max_train_blocks]

    def eval_texts(self) -> list[str]:
        """Held-out chunks of text: consecutive `block_size`-token pieces of the test articles (teacher tokens),
        decoded, the first `eval_blocks` of them."""
        from hf_distill.tasks.lm.data import pack_into_blocks

        tokenizer = self.tokenizer()
        ids = tokenizer(self.texts["test"], add_special_tokens=False, verbose=False)["input_ids"]
        blocks = pack_into_blocks(ids, self.block_size)[: self.eval_blocks]
        return [tokenizer.decode(block) for block in blocks]

    def prompt_ids(self) -> list[list[int]]:
        """The first `prompt_tokens` teacher tokens of each of the first test articles long enough, `prompts` of them."""
        tokenizer = self.tokenizer()
        prompts = []
        for text in self.texts["test"]:
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= self.prompt_tokens:
                prompts.append(ids[: self.prompt_tokens])
            if len(prompts) == self.prompts:
                return prompts
        raise ValueError(
            f"data: only {len(prompts)} test texts have {self.prompt_tokens} tokens; lower prompts or prompt_tokens."
        )


def _load_tokenizer(path: Path | None) -> PreTrainedTokenizerBase:
    if path is None:
        raise ValueError("no tokenizer: the teacher folder holds none and the recipe trains no teacher.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ids_for(
    stage_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase, ids: list[int]
) -> list[int]:
    """The teacher's token ids under a stage's vocabulary (the same tokens; vocabulary pruning renumbers them)."""
    if stage_tokenizer.get_vocab() == teacher_tokenizer.get_vocab():
        return list(ids)
    vocab = stage_tokenizer.get_vocab()
    tokens = teacher_tokenizer.convert_ids_to_tokens(ids)
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise ValueError(
            f"the stage's vocabulary lacks prompt tokens {missing[:5]}; keep them when pruning it."
        )
    return [vocab[token] for token in tokens]


# --------------------------------------------------------------------------------------------- reading
def _read_texts(path: str) -> list[str]:
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as handle:
            return [row["text"] for row in csv.DictReader(handle)]
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle if line.strip()]
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def _read_pairs(path: str, source: str, target: str) -> list[tuple[str, str]]:
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)["translation"]
                pairs.append((row[source], row[target]))
    return pairs


def _transduction_module() -> Any:
    """The synthetic transduction of benchmarks/_transduction.py (a source checkout's), which bbc_text uses for
    translation: no parallel corpus installs offline."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_transduction.py"
    if not path.is_file():
        raise ValueError(
            "data: bbc_text for translation rewrites BBC sentences with benchmarks/_transduction.py, which only a "
            "source checkout has; run from the repository, or give train_file / test_file (JSON lines of pairs)."
        )
    spec = importlib.util.spec_from_file_location("hf_distill_transduction", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bbc_articles(data_dir: Path, seed: int, limit: int | None = None) -> dict[str, list[str]]:
    from hf_distill.tasks.classification.bbc import prepare_bbc_splits

    files = prepare_bbc_splits(data_dir, seed)
    return {split: _read_texts(files[split])[:limit] for split in SPLITS}


def _bbc_pairs(
    data_dir: Path, seed: int, limit: int | None = None, max_words: int = 24
) -> dict[str, list[tuple[str, str]]]:
    """BBC sentences of 5-`max_words` words and their transduction, each sentence once, split by article."""
    module = _transduction_module()
    articles = _bbc_articles(data_dir, seed, limit)
    seen: set[str] = set()
    pairs: dict[str, list[tuple[str, str]]] = {}
    for split in SPLITS:
        rows = []
        for article in articles[split]:
            for sentence in module.split_sentences(article, 5, max_words):
                if sentence not in seen:
                    seen.add(sentence)
                    rows.append((sentence, module.transduce(sentence)))
        pairs[split] = rows
    return pairs


def _train_tokenizer(recipe: GenerationRecipe, texts: list[str], folder: Path) -> Path:
    """The tokenizer of a teacher the recipe trains: byte-level BPE (causal LM) or a Marian-style Unigram with
    `</s>` appended and pad 0 (translation), trained on the training split once."""
    if (folder / "tokenizer.json").is_file():
        return folder
    vocab_size = recipe.teacher.vocab_size
    if recipe.task == CAUSAL_LM:
        from hf_distill.tasks.lm.cross_tokenizer import train_tokenizer

        tokenizer = train_tokenizer("byte_bpe", texts, vocab_size)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        model = Tokenizer(models.Unigram())
        model.pre_tokenizer = pre_tokenizers.Metaspace()
        model.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
        )
        model.train_from_iterator(texts, trainer)
        model.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", model.token_to_id("</s>"))]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        )
    tokenizer.model_max_length = 2 * recipe.data.block_size
    with atomic_directory(folder, overwrite=True) as building:
        tokenizer.save_pretrained(building)
    return folder


def prepare_generation_data(
    recipe: GenerationRecipe, output_dir: Path, teacher_dir: Path | None
) -> GenerationData:
    """Read (or, for bbc_text, write) the splits and, when the recipe trains its teacher, train its tokenizer
    into <output_dir>/data/tokenizer. Cheap: runs before the first stage, so the checks can use it."""
    spec = recipe.data
    data_dir = output_dir / "data"
    result = GenerationData(
        task=recipe.task,
        block_size=spec.block_size,
        max_train_blocks=spec.max_train_blocks,
        eval_blocks=spec.eval_blocks,
        calibration_blocks=spec.calibration_blocks,
        prompts=spec.prompts,
        prompt_tokens=spec.prompt_tokens,
        new_tokens=spec.new_tokens,
        measure_memory=spec.measure_memory,
    )
    if recipe.task == CAUSAL_LM:
        if spec.bbc_text:
            result.texts = _bbc_articles(data_dir, recipe.training.seed, spec.max_articles)
        else:
            files = {"train": spec.train_file, "validation": spec.validation_file, "test": spec.test_file}
            result.texts = {split: _read_texts(path) for split, path in files.items() if path is not None}
        training_text = result.texts["train"]
    else:
        if spec.bbc_text:
            result.pairs = _bbc_pairs(data_dir, recipe.training.seed, spec.max_articles)
        else:
            files = {"train": spec.train_file, "validation": spec.validation_file, "test": spec.test_file}
            result.pairs = {
                split: _read_pairs(path, spec.source_lang, spec.target_lang)
                for split, path in files.items()
                if path is not None
            }
        rng = random.Random(recipe.training.seed)
        rng.shuffle(result.pairs["train"])
        training_text = [text for pair in result.pairs["train"] for text in pair]
    if recipe.teacher.train_steps > 0:
        result.tokenizer_dir = _train_tokenizer(recipe, training_text, data_dir / "tokenizer")
    else:
        result.tokenizer_dir = teacher_dir
    return result
