"""The causal-LM recipe: packing, prompt/completion masking, chat rendering, student sampling (on_policy.py),
sequence-level KD, LoRA students, vocabulary checks, and scripts/distill_lm.py end to end on tiny Llama/GPT-2
models and files in tmp_path."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.testing_utils import CaptureLogger

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.training.on_policy import generate_completions, prompt_token_lists, student_completions

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


distill_lm = _load_script("distill_lm")
lm = distill_lm.lm  # hf_distill.tasks.lm.recipe: the recipe's public names, gathered from its modules
generation_limits = importlib.import_module("hf_distill.tasks.common.generation_limits")
lm_seq_kd = importlib.import_module("hf_distill.tasks.lm.seq_kd")
lm_report = importlib.import_module("hf_distill.tasks.lm.report")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- helpers
def tiny_llama(
    vocab_size: int, *, layers: int = 2, hidden: int = 32, seed: int = 0, tokenizer=None
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    special = {}
    if tokenizer is not None:
        special = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **special,
    )
    return LlamaForCausalLM(config)


def save_model(path: Path, model, tokenizer=None) -> str:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def sentences(n: int, seed: int, low: int = 5, high: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prompt_completion_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
            "completion": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))),
        }
        for _ in range(n)
    ]


def data_args(**values) -> lm.DataArguments:
    return lm.DataArguments(**values)


def run_flags(output_dir: Path, max_steps: int = 3) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-2",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        "--report_to", "none",
        "--use_cpu", "true",
        "--seed", "0",
        "--report_batch_sizes", "1,2",
        "--latency_repeats", "1",
        "--latency_warmup", "0",
        "--report_generations", "2",
        "--report_max_new_tokens", "4",
    ]  # fmt: skip


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a different word list than the fixture's."""
    vocab = {
        token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)])
    }
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


# --------------------------------------------------------------------------------------------- packing
def test_pack_into_blocks_concatenates_and_drops_the_remainder():
    blocks = lm.pack_into_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], block_size=4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert lm.pack_into_blocks([[1, 2]], block_size=4) == []


def test_text_files_are_tokenized_and_packed_like_run_clm(tmp_path, lm_tokenizer):
    train = sentences(30, seed=1)
    path = write_lines(tmp_path / "train.txt", train)
    args = data_args(train_file=path, block_size=8, validation_split_percentage=10)
    raw = lm.load_raw_datasets(args)
    # Without a validation file the first 10% of the training lines are held out.
    assert [text.rstrip("\n") for text in raw["validation"]["text"]] == train[:3]  # line breaks are kept
    assert [text.rstrip("\n") for text in raw["train"]["text"]] == train[3:]
    data_format = lm.resolve_data_format(raw, args)
    assert data_format == lm.DataFormat(lm.TEXT, ("text",))
    tokenized = lm.preprocess(raw, data_format, lm_tokenizer, 8, args)

    stream = [token for text in train[3:] for token in lm_tokenizer(text)["input_ids"]]
    expected = [stream[i : i + 8] for i in range(0, len(stream) - len(stream) % 8, 8)]
    assert list(tokenized["train"]["input_ids"]) == expected
    assert list(tokenized["train"]["labels"]) == expected
    assert all(mask == [1] * 8 for mask in tokenized["train"]["attention_mask"])

    limited = lm.preprocess(
        raw, data_format, lm_tokenizer, 8, data_args(train_file=path, block_size=8, max_train_samples=2)
    )
    assert list(limited["train"]["input_ids"]) == expected[:2]  # counted in blocks, as run_clm.py does


def test_too_little_text_for_one_block_raises(tmp_path, lm_tokenizer):
    path = write_lines(tmp_path / "train.txt", ["the cat"])
    args = data_args(train_file=path, validation_split_percentage=0)
    raw = lm.load_raw_datasets(args)
    with pytest.raises(ValueError, match="yields no blocks of 64 tokens"):
        lm.preprocess(raw, lm.resolve_data_format(raw, args), lm_tokenizer, 64, args)


def test_block_size_defaults_to_the_tokenizer_maximum(lm_tokenizer):
    assert lm.resolve_block_size(data_args(train_file="x.txt"), lm_tokenizer) == 128
    assert lm.resolve_block_size(data_args(train_file="x.txt", block_size=512), lm_tokenizer) == 128
    assert lm.resolve_block_size(data_args(train_file="x.txt", block_size=16), lm_tokenizer) == 16


# --------------------------------------------------------------------------------------------- prompt/completion
def test_prompt_tokens_are_labelled_minus_100(tmp_path, lm_tokenizer):
    rows = [
        {"prompt": "the cat is", "completion": "very happy"},
        {"prompt": "hello world", "completion": "good"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    args = data_args(train_file=path, validation_split_percentage=0)
    raw = lm.load_raw_datasets(args)
    data_format = lm.resolve_data_format(raw, args)
    assert data_format.kind == lm.PROMPT_COMPLETION
    tokenized = lm.preprocess(raw, data_format, lm_tokenizer, 32, args)["train"]

    vocab = lm_tokenizer.get_vocab()
    bos, eos = lm_tokenizer.bos_token_id, lm_tokenizer.eos_token_id
    first = [bos, vocab["the"], vocab["cat"], vocab["is"], vocab["very"], vocab["happy"], eos]
    assert tokenized[0]["input_ids"] == first
    assert tokenized[0]["labels"] == [-100] * 4 + first[4:]
    assert tokenized[1]["labels"] == [-100, -100, -100, vocab["good"], eos]
    assert tokenized[1]["attention_mask"] == [1] * 5


def test_rows_whose_prompt_fills_the_block_are_dropped_and_completions_truncated(tmp_path, lm_tokenizer):
    rows = [
        {"prompt": "the cat", "completion": "is very happy and good"},
        {"prompt": "a very long prompt that fills it", "completion": "good"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    args = data_args(train_file=path, validation_split_percentage=0)
    raw = lm.load_raw_datasets(args)
    tokenized = lm.preprocess(raw, lm.resolve_data_format(raw, args), lm_tokenizer, 5, args)["train"]
    assert len(tokenized) == 1
    assert len(tokenized[0]["input_ids"]) == 5
    assert tokenized[0]["labels"][:3] == [-100] * 3


def test_encode_prompt_completion():
    assert lm.encode_prompt_completion([1, 2], [3, 4, 5], 4) == {
        "input_ids": [1, 2, 3, 4],
        "attention_mask": [1, 1, 1, 1],
        "labels": [-100, -100, 3, 4],
    }
    assert lm.encode_prompt_completion([1, 2, 3], [4], 3) is None


def test_trainer_loss_ignores_prompt_positions(tmp_path, lm_tokenizer):
    rows = prompt_completion_rows(4, seed=3)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    args = data_args(train_file=path, validation_split_percentage=0)
    raw = lm.load_raw_datasets(args)
    tokenized = lm.preprocess(raw, lm.resolve_data_format(raw, args), lm_tokenizer, 32, args)["train"]
    collator = lm.CausalLMCollator(lm_tokenizer.pad_token_id)
    batch = collator([tokenized[i] for i in range(len(tokenized))])

    student = tiny_llama(len(lm_tokenizer), layers=1, seed=1)
    teacher = tiny_llama(len(lm_tokenizer), layers=2, seed=2)
    temperature, alpha = 2.0, 0.3
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationTrainingArguments(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            report_to="none",
            temperature=temperature,
            alpha=alpha,
        ),
        processing_class=lm_tokenizer,
        data_collator=collator,
    )
    student.train()
    loss = trainer.compute_loss(student, dict(batch))

    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student_logits = student(**inputs).logits[:, :-1]
        teacher_logits = teacher(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    completion = targets.ne(-100)
    # Prompt and padding positions exist and are excluded.
    assert completion.sum() < batch["attention_mask"][:, 1:].sum()
    ce = F.cross_entropy(student_logits[completion], targets[completion])
    log_p_student = F.log_softmax(student_logits[completion] / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits[completion] / temperature, dim=-1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean() * temperature**2
    assert loss.item() == pytest.approx(((1 - alpha) * ce + alpha * kl).item(), rel=1e-4)

    # The same batch with every real position labelled gives a different loss.
    everything = batch["input_ids"].masked_fill(batch["attention_mask"].eq(0), -100)
    assert trainer.compute_loss(student, dict(batch, labels=everything)).item() != pytest.approx(
        loss.item(), rel=1e-3
    )


def test_collator_pads_rows_and_cached_columns(lm_tokenizer):
    k = 3
    features = [
        {
            "input_ids": [5, 6, 7],
            "labels": [-100, 6, 7],
            "teacher_topk_logprobs": [-0.1 * i for i in range(3 * k)],
            "teacher_topk_indices": list(range(3 * k)),
            "teacher_tail_logmass": [-2.0, -3.0, -4.0],
        },
        {
            "input_ids": [8, 9],
            "labels": [8, 9],
            "teacher_topk_logprobs": [-1.0] * (2 * k),
            "teacher_topk_indices": [4] * (2 * k),
            "teacher_tail_logmass": [-5.0, -6.0],
        },
    ]
    batch = lm.CausalLMCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert batch["teacher_topk_logprobs"].shape == (2, 3, k)
    assert batch["teacher_topk_logprobs"].dtype == torch.float32
    assert batch["teacher_topk_indices"].dtype == torch.long
    assert batch["teacher_topk_indices"][0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert batch["teacher_topk_indices"][1, 2].tolist() == [0, 0, 0]
    assert batch["teacher_topk_logprobs"][1, 2].tolist() == [0.0, 0.0, 0.0]
    assert batch["teacher_tail_logmass"].dtype == torch.float32
    assert batch["teacher_tail_logmass"].tolist() == [[-2.0, -3.0, -4.0], [-5.0, -6.0, 0.0]]
    assert lm.CausalLMCollator(pad_token_id=0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)


# --------------------------------------------------------------------------------------------- chat data
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


def test_messages_are_rendered_with_the_chat_template(tmp_path, lm_tokenizer):
    lm_tokenizer.chat_template = CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "is very happy"},
    ]
    prompt, completion = lm.render_messages(conversation, lm_tokenizer)
    assert prompt == "user hello world </s> assistant good </s> user the cat </s> assistant"
    assert completion == " is very happy </s> "

    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}])
    args = data_args(train_file=path, validation_split_percentage=0)
    raw = lm.load_raw_datasets(args)
    data_format = lm.resolve_data_format(raw, args)
    assert data_format.kind == lm.MESSAGES
    row = lm.preprocess(raw, data_format, lm_tokenizer, 64, args)["train"][0]
    vocab = lm_tokenizer.get_vocab()
    learned = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
    # Only the last answer is learned; the template's end-of-turn token is the eos, so none is added.
    assert learned == [vocab["is"], vocab["very"], vocab["happy"], lm_tokenizer.eos_token_id]
    assert row["input_ids"][0] == lm_tokenizer.bos_token_id


def test_messages_without_a_chat_template_and_bad_conversations(lm_tokenizer):
    prompt, completion = lm.render_messages(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good"}], lm_tokenizer
    )
    assert prompt == "user: hello\nassistant:"
    assert completion == " good"
    with pytest.raises(ValueError, match="must have role 'assistant'"):
        lm.render_messages([{"role": "user", "content": "hello"}], lm_tokenizer)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        lm.render_messages([{"text": "hello"}], lm_tokenizer)


def test_missing_columns_name_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "b"}])
    raw = lm.load_raw_datasets(data_args(train_file=path, validation_split_percentage=0))
    with pytest.raises(ValueError, match=r"Column\(s\) \['text'\] not found.*\['question', 'answer'\]"):
        lm.resolve_data_format(raw, data_args(train_file=path))
    with pytest.raises(ValueError, match=r"\['prompt', 'completion'\] not found.*--prompt_column_name"):
        lm.resolve_data_format(raw, data_args(train_file=path, data_format="prompt_completion"))
    data_format = lm.resolve_data_format(
        raw, data_args(train_file=path, prompt_column_name="question", completion_column_name="answer")
    )
    assert data_format == lm.DataFormat(lm.PROMPT_COMPLETION, ("question", "answer"))


def test_bad_flags_raise(tmp_path):
    with pytest.raises(ValueError, match="No data"):
        lm.DataArguments()
    with pytest.raises(ValueError, match="Unsupported data file type"):
        lm.DataArguments(train_file="train.xml")
    with pytest.raises(ValueError, match="data_format must be one of"):
        lm.DataArguments(train_file="train.txt", data_format="chat")
    with pytest.raises(ValueError, match="needs --use_peft"):
        lm.LoraArguments(merge_lora=True)


# --------------------------------------------------------------------------------------------- on-policy sampling
STOP = 20  # the transition model's token that is followed by eos


def transition_model(tokenizer) -> LlamaForCausalLM:
    """A Llama whose next token is a fixed function of the current one: i -> i + 1, STOP -> eos.

    One-hot embeddings, a layer zeroed to the identity (its residual branches write nothing), and an LM head that
    gives the successor a logit of about 113 and every other token 0, so even sampling at temperature 1 follows
    the rule (the runner-up has probability ~e^-113).
    """
    vocab = len(tokenizer)
    model = tiny_llama(vocab, layers=1, hidden=128, tokenizer=tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        embedding = torch.zeros(vocab, 128)
        embedding[torch.arange(vocab), torch.arange(vocab)] = 1.0
        model.model.embed_tokens.weight.copy_(embedding)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, 128)
        for token in range(vocab):
            successor = eos if token == STOP else min(token + 1, vocab - 1)
            head[successor, token] = 10.0
        model.lm_head.weight.copy_(head)
    return model


def prompt_completion_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of (prompt, completion) rows, labels -100 on prompt and padding."""
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), pad)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_student_completions_masks_pads_and_stops_at_eos(lm_tokenizer):
    model = transition_model(lm_tokenizer)
    pad, eos = lm_tokenizer.pad_token_id, lm_tokenizer.eos_token_id
    batch = prompt_completion_batch(
        [
            ([2, 10, 16], [50, 51, 52, 53]),  # 17, 18, 19, 20 (STOP), then eos: 5 tokens
            ([2, 30], [7]),  # 31 ... 36: never reaches STOP within 6 tokens
            ([2, 5, 6, 7, 8, 19], [9]),  # 20 (STOP), eos
        ],
        pad,
    )
    model.train()
    out = student_completions(
        model, batch, pad_token_id=pad, eos_token_id=eos, max_new_tokens=6, temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    expected = [
        ([2, 10, 16], [17, 18, 19, 20, eos]),
        ([2, 30], [31, 32, 33, 34, 35, 36]),
        ([2, 5, 6, 7, 8, 19], [20, eos]),
    ]
    length = max(len(p) + len(c) for p, c in expected)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (3, length)
    for row, (prompt, completion) in enumerate(expected):
        n, m = len(prompt), len(completion)
        assert out["input_ids"][row, : n + m].tolist() == prompt + completion
        assert out["input_ids"][row, n + m :].eq(pad).all()
        assert out["attention_mask"][row].tolist() == [1] * (n + m) + [0] * (length - n - m)
        assert out["labels"][row].tolist() == [-100] * n + completion + [-100] * (length - n - m)
    assert out["input_ids"].dtype == torch.long
    assert model.training  # the training mode is restored after generation
    assert not out["input_ids"].requires_grad


def test_completions_follow_a_list_of_eos_ids_and_left_padded_input(lm_tokenizer):
    model = transition_model(lm_tokenizer)
    pad = lm_tokenizer.pad_token_id
    # Left-padded rows: the prompt is found from the attention mask and the first labelled position.
    batch = {
        "input_ids": torch.tensor([[pad, pad, 2, 10, 11], [2, 40, 41, 42, 43]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, -100, -100, 11], [-100, -100, 41, 42, 43]]),
    }
    assert [p.tolist() for p in prompt_token_lists(batch)] == [[2, 10], [2, 40]]
    out = generate_completions(
        model, batch, pad_token_id=pad, eos_token_id=[13, 44], max_new_tokens=5, do_sample=False
    )
    # 10 -> 11 -> 12 -> 13 ends at eos id 13; 40 -> ... -> 44 ends at eos id 44.
    assert out["input_ids"].tolist() == [[2, 10, 11, 12, 13, pad], [2, 40, 41, 42, 43, 44]]
    assert out["labels"].tolist() == [[-100, -100, 11, 12, 13, -100], [-100, -100, 41, 42, 43, 44]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]


def test_student_completions_come_from_the_model_and_are_seeded(lm_tokenizer):
    pad, eos = lm_tokenizer.pad_token_id, lm_tokenizer.eos_token_id
    model = tiny_llama(len(lm_tokenizer), layers=1, seed=5)
    batch = prompt_completion_batch([([2, 10, 11], [12, 13]), ([2, 40], [41])], pad)
    options = dict(pad_token_id=pad, eos_token_id=eos, max_new_tokens=8)

    # At a tiny temperature sampling is greedy decoding, which generate() computes independently.
    cold = student_completions(
        model, batch, temperature=1e-4, generator=torch.Generator().manual_seed(0), **options
    )
    for row, prompt in enumerate([[2, 10, 11], [2, 40]]):
        greedy = model.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=pad,
            eos_token_id=eos,
        )[0, len(prompt) :].tolist()
        if eos in greedy:
            greedy = greedy[: greedy.index(eos) + 1]
        labels = cold["labels"][row]
        assert labels[labels.ne(-100)].tolist() == greedy

    state = torch.get_rng_state()
    first = student_completions(
        model, batch, temperature=1.0, generator=torch.Generator().manual_seed(1), **options
    )
    again = student_completions(
        model, batch, temperature=1.0, generator=torch.Generator().manual_seed(1), **options
    )
    other = student_completions(
        model, batch, temperature=1.0, generator=torch.Generator().manual_seed(2), **options
    )
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_student_completions_rejects_rows_without_prompt(lm_tokenizer):
    model = tiny_llama(len(lm_tokenizer), layers=1)
    batch = {"input_ids": torch.tensor([[2, 5, 6]]), "labels": torch.tensor([[2, 5, 6]])}
    with pytest.raises(ValueError, match="no prompt tokens"):
        student_completions(model, batch, pad_token_id=0, eos_token_id=3, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        student_completions(model, batch, pad_token_id=0, eos_token_id=3, max_new_tokens=2, temperature=0.0)


# --------------------------------------------------------------------------------------------- loading
def test_unreachable_model_name_says_offline_and_how_to_pass_a_path(lm_tokenizer):
    args = lm.LMModelArguments(teacher_model_name_or_path="someone/not-a-cached-model", student_num_layers=1)
    with pytest.raises(OSError, match="offline.*pass a local path"):
        lm.load_teacher(args)


def test_different_tokenizers_are_rejected_before_training(tmp_path, lm_tokenizer):
    teacher = save_model(tmp_path / "teacher", tiny_llama(len(lm_tokenizer)), lm_tokenizer)
    student_tokenizer = other_tokenizer()
    student = save_model(
        tmp_path / "student", tiny_llama(len(student_tokenizer), layers=1), student_tokenizer
    )
    train = write_lines(tmp_path / "train.txt", sentences(20, seed=0))
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student,
        "--train_file", train, "--block_size", "8", "--do_train",
    ] + run_flags(tmp_path / "out")  # fmt: skip
    with pytest.raises(ValueError, match="different vocabularies"):
        distill_lm.main(argv)
    assert not (tmp_path / "out" / "train_results.json").exists()


# --------------------------------------------------------------------------------------------- scripts end to end
@pytest.fixture
def text_files(tmp_path):
    return (
        write_lines(tmp_path / "train.txt", sentences(60, seed=0)),
        write_lines(tmp_path / "valid.txt", sentences(12, seed=1)),
    )


def test_distill_lm_end_to_end_writes_perplexity_and_report(tmp_path, lm_tokenizer, text_files):
    teacher = save_model(
        tmp_path / "teacher", tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer), lm_tokenizer
    )
    train, valid = text_files
    out = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1",
        "--train_file", train, "--validation_file", valid, "--block_size", "16",
        "--do_train", "--do_eval", "--kd_loss", "jsd", "--temperature", "2", "--alpha", "0.5",
    ] + run_flags(out)  # fmt: skip
    results = distill_lm.main(argv)

    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["perplexity"] == pytest.approx(math.exp(eval_results["eval_loss"]))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    log_history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("kd_loss" in entry for entry in log_history)

    report = json.loads((out / "distill_report.json").read_text())
    assert report["primary_metric"] == "perplexity" and report["greater_is_better"] is False
    teacher_entry, student_entry = report["models"]["teacher"], report["models"]["student"]
    assert student_entry["metrics"]["perplexity"] == pytest.approx(eval_results["perplexity"])
    assert teacher_entry["metrics"]["perplexity"] == pytest.approx(math.exp(teacher_entry["metrics"]["loss"]))
    assert teacher_entry["params"] > student_entry["params"]
    assert set(student_entry["tokens_per_second"]) == {"1", "2"}
    assert len(report["generations"]) == 2
    assert {"prompt", "teacher", "student"} <= set(report["generations"][0])
    markdown = (out / "distill_report.md").read_text()
    assert "Greedy generations" in markdown and "tokens/s" in markdown
    assert results["eval"]["perplexity"] == eval_results["perplexity"]


def test_gpt2_teacher_with_a_padded_vocabulary(tmp_path, lm_tokenizer, text_files):
    # The teacher's embedding matrix has 28 rows beyond the tokenizer; the student has exactly the tokenizer's.
    torch.manual_seed(0)
    config = dict(
        n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    teacher = save_model(
        tmp_path / "teacher",
        GPT2LMHeadModel(GPT2Config(vocab_size=len(lm_tokenizer) + 28, **config)),
        lm_tokenizer,
    )
    student = save_model(
        tmp_path / "student",
        GPT2LMHeadModel(GPT2Config(vocab_size=len(lm_tokenizer), **{**config, "n_layer": 1})),
    )
    train, valid = text_files
    out = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student,
        "--train_file", train, "--validation_file", valid, "--block_size", "16", "--do_train", "--do_eval",
        "--report_generations", "0",
    ] + run_flags(out, max_steps=2)  # fmt: skip
    distill_lm.main(argv)
    log_history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    kd = [entry["kd_loss"] for entry in log_history if "kd_loss" in entry]
    assert kd and all(math.isfinite(value) for value in kd)
    assert math.isfinite(json.loads((out / "eval_results.json").read_text())["perplexity"])


def test_raw_text_with_seq_kd_or_on_policy_is_refused(tmp_path, lm_tokenizer, text_files):
    teacher = save_model(tmp_path / "teacher", tiny_llama(len(lm_tokenizer)), lm_tokenizer)
    train, _ = text_files
    base = [
        "--teacher_model_name_or_path",
        teacher,
        "--student_num_layers",
        "1",
        "--train_file",
        train,
        "--do_train",
    ]
    for extra in (["--seq_kd"], ["--lmbda", "0.5"]):
        with pytest.raises(ValueError, match="need prompts to complete"):
            distill_lm.main(base + extra + run_flags(tmp_path / "out"))


@pytest.fixture
def prompt_completion_files(tmp_path):
    return (
        write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(12, seed=0)),
        write_jsonl(tmp_path / "valid.jsonl", prompt_completion_rows(4, seed=1)),
    )


def _completion(row: dict) -> list[int]:
    return [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]


def test_seq_kd_trains_on_cached_teacher_completions(tmp_path, lm_tokenizer, prompt_completion_files):
    teacher_model = tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer, seed=3)
    teacher = save_model(tmp_path / "teacher", teacher_model, lm_tokenizer)
    train, _ = prompt_completion_files
    out = tmp_path / "out"
    cache = tmp_path / "seq_kd"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
        "--validation_split_percentage", "0", "--block_size", "24", "--do_train", "--seq_kd",
        "--seq_kd_max_new_tokens", "5", "--seq_kd_cache_dir", str(cache),
    ] + run_flags(out, max_steps=2)  # fmt: skip
    distill_lm.main(argv)

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["kind"] == "seq_kd_completions" and manifest["max_new_tokens"] == 5
    cached = Dataset.load_from_disk(str(cache / "data"))
    originals = [json.loads(line) for line in Path(train).read_text().splitlines()]
    assert len(cached) == len(originals)
    eos = lm_tokenizer.eos_token_id
    for row, original in zip(cached, originals):
        prompt = lm_tokenizer(original["prompt"])["input_ids"]
        assert row["input_ids"][: len(prompt)] == prompt and row["labels"][: len(prompt)] == [-100] * len(
            prompt
        )
        greedy = teacher_model.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=0,
            eos_token_id=eos,
        )[0, len(prompt) :].tolist()
        if eos in greedy:
            greedy = greedy[: greedy.index(eos) + 1]
        assert _completion(row) == greedy  # the teacher's completion replaced the reference
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == len(cached)

    # A second run with the same inputs reuses the cache; other settings or a partial cache rebuild it.
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    distill_lm.main(argv)
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp
    changed = [value if value != "5" else "3" for value in argv]
    distill_lm.main(changed)
    assert json.loads((cache / "manifest.json").read_text())["max_new_tokens"] == 3
    assert all(len(_completion(row)) <= 3 for row in Dataset.load_from_disk(str(cache / "data")))
    (cache / "manifest.json").unlink()  # as if the build had been killed before it finished
    distill_lm.main(argv)
    assert json.loads((cache / "manifest.json").read_text())["max_new_tokens"] == 5


def test_lora_student_saves_adapters_and_a_merged_model(tmp_path, lm_tokenizer, prompt_completion_files):
    from peft import PeftModel

    teacher = save_model(
        tmp_path / "teacher", tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer), lm_tokenizer
    )
    train, valid = prompt_completion_files
    out = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
        "--validation_file", valid, "--do_train", "--do_eval", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0.0", "--lora_target_modules", "q_proj,v_proj", "--merge_lora",
        "--report_generations", "1",
    ] + run_flags(out, max_steps=3)  # fmt: skip
    distill_lm.main(argv)

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # adapters only
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    base = LlamaForCausalLM.from_pretrained(out / "base_model")
    merged = LlamaForCausalLM.from_pretrained(out / "merged")
    assert merged.config.num_hidden_layers == 1
    inputs = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        base_logits = base(inputs).logits
        merged_logits = merged(inputs).logits
        adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base_model"), str(out))
        adapted_logits = adapted(inputs).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the adapters learned something
    report = json.loads((out / "distill_report.json").read_text())
    assert report["lora"] is True
    # The report measures the merged student, not the adapters.
    assert report["models"]["student"]["params"] == sum(p.numel() for p in merged.parameters())


def test_on_policy_steps_train_on_student_samples(
    tmp_path, lm_tokenizer, prompt_completion_files, monkeypatch
):
    import hf_distill.training.on_policy as on_policy

    calls = []

    def recording(model, batch, **options):
        out = student_completions(model, batch, **options)
        calls.append((batch["input_ids"].shape[0], options["max_new_tokens"], out))
        return out

    monkeypatch.setattr(on_policy, "student_completions", recording)
    teacher = save_model(
        tmp_path / "teacher", tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer), lm_tokenizer
    )
    train, _ = prompt_completion_files
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
        "--validation_split_percentage", "0", "--do_train", "--lmbda", "1.0", "--on_policy_max_new_tokens", "4",
    ] + run_flags(tmp_path / "out", max_steps=2)  # fmt: skip
    distill_lm.main(argv)
    assert [(rows, max_new) for rows, max_new, _ in calls] == [(4, 4), (4, 4)]
    for _, _, batch in calls:
        completion_lengths = batch["labels"].ne(-100).sum(dim=1)
        assert completion_lengths.min() >= 1 and completion_lengths.max() <= 4
    log_history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert sum("kd_loss" in entry for entry in log_history) == 2


def test_streaming_text_data(tmp_path, lm_tokenizer):
    teacher = save_model(
        tmp_path / "teacher", tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer), lm_tokenizer
    )
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in sentences(40, seed=0)])
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": text} for text in sentences(10, seed=1)])
    base = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
        "--validation_file", valid, "--streaming", "--block_size", "16", "--do_train", "--do_eval",
        "--report_generations", "1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs --max_eval_samples"):
        distill_lm.main(base + run_flags(tmp_path / "out", max_steps=2))
    results = distill_lm.main(base + ["--max_eval_samples", "3"] + run_flags(tmp_path / "out", max_steps=2))
    assert results["eval"]["eval_samples"] == 3
    assert math.isfinite(results["eval"]["perplexity"])


# --------------------------------------------------------------------------------------------- generation limits
def _padded_teacher(tokenizer, extra_rows: int = 64) -> LlamaForCausalLM:
    """A Llama teacher whose embedding and LM head have `extra_rows` rows past the tokenizer, and whose head makes
    those rows the most likely at every position: rows +-1000 * e_j give the logit 1000 * max_j |h_j| to the best
    padded id, far above any real token's (|h . w| <= ||h|| * ||w|| with init-scale w)."""
    shared = len(tokenizer)
    model = tiny_llama(shared + extra_rows, tokenizer=tokenizer, seed=5)
    hidden = model.config.hidden_size
    assert extra_rows == 2 * hidden
    with torch.no_grad():
        model.lm_head.weight[shared : shared + hidden] = 1000 * torch.eye(hidden)
        model.lm_head.weight[shared + hidden :] = -1000 * torch.eye(hidden)
    return model.eval()


def _reference_restricted_greedy(model, prompt: list[int], vocab_size: int, max_new_tokens: int, eos: int):
    """Greedy decoding written out: a full forward pass per step, argmax over the first `vocab_size` logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            ids.append(int(logits[:vocab_size].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt) :]


def test_seq_kd_with_a_padded_teacher_stays_in_the_shared_vocabulary(
    tmp_path, lm_tokenizer, prompt_completion_files
):
    shared = len(lm_tokenizer)
    teacher_model = _padded_teacher(lm_tokenizer)
    teacher = save_model(tmp_path / "teacher", teacher_model, lm_tokenizer)
    # The student has exactly the tokenizer's rows: an id >= shared would fail in its embedding.
    student = save_model(tmp_path / "student", tiny_llama(shared, layers=1, tokenizer=lm_tokenizer, seed=1))
    train, _ = prompt_completion_files
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    prompts = [lm_tokenizer(row["prompt"])["input_ids"] for row in rows]
    # Precondition: left alone, the teacher writes nothing but padded ids.
    unconstrained = teacher_model.generate(
        input_ids=torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=4, pad_token_id=0
    )[0, len(prompts[0]) :]
    assert (unconstrained >= shared).all()

    cache = tmp_path / "seq_kd"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student, "--train_file", train,
        "--validation_split_percentage", "0", "--block_size", "24", "--do_train", "--seq_kd",
        "--seq_kd_max_new_tokens", "4", "--seq_kd_batch_size", "5", "--seq_kd_cache_dir", str(cache),
    ] + run_flags(tmp_path / "out", max_steps=1)  # fmt: skip
    distill_lm.main(argv)  # trains a step on the cached completions

    cached = Dataset.load_from_disk(str(cache / "data"))
    assert len(cached) == len(prompts)
    assert max(max(row) for row in cached["input_ids"]) < shared
    assert json.loads((cache / "manifest.json").read_text())["vocab_size"] == shared
    eos = lm_tokenizer.eos_token_id
    for row, prompt in zip(cached, prompts):
        # What the teacher writes when the padded ids do not exist (batched, left-padded generation).
        expected = _reference_restricted_greedy(teacher_model, prompt, shared, 4, eos)
        assert _completion(row) == expected
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert any("loss" in entry and math.isfinite(entry["loss"]) for entry in history)

    # A cache whose manifest matches but which holds an id the student cannot read is refused, naming the fix.
    tampered = cached.map(
        lambda row, index: {"input_ids": row["input_ids"][:-1] + [shared + 3]} if index == 2 else {},
        with_indices=True,
    )
    tampered.save_to_disk(str(tmp_path / "tampered"))
    shutil.rmtree(cache / "data")
    shutil.move(str(tmp_path / "tampered"), str(cache / "data"))
    with pytest.raises(ValueError, match=rf"token id {shared + 3} \(row 2\).*--seq_kd_overwrite_cache"):
        distill_lm.main(argv)
    # The flag it names rebuilds the cache, and the run trains.
    distill_lm.main(argv + ["--seq_kd_overwrite_cache"])
    assert max(max(row) for row in Dataset.load_from_disk(str(cache / "data"))["input_ids"]) < shared


def test_shared_vocabulary_logits_processor_masks_and_renormalises():
    torch.manual_seed(0)
    processor = generation_limits.SharedVocabularyLogitsProcessor(5)
    scores = torch.randn(3, 8)
    masked = processor(torch.zeros(3, 1, dtype=torch.long), scores)
    assert torch.isneginf(masked[:, 5:]).all()
    # log p(token | token < 5), written out in float64
    shared = scores[:, :5].double()
    expected = shared - shared.exp().sum(dim=-1, keepdim=True).log()
    assert torch.allclose(masked[:, :5].double(), expected, atol=1e-6)
    # The same from log-probabilities over the whole vocabulary (what beam search hands the processors).
    from_logprobs = processor(None, scores.log_softmax(dim=-1))
    assert torch.allclose(from_logprobs[:, :5].double(), expected, atol=1e-6)
    assert torch.equal(processor(None, scores[:, :5]), scores[:, :5])  # a vocabulary within the limit


def test_lengths_are_bounded_by_a_gpt2_position_table(tmp_path, lm_tokenizer, prompt_completion_files):
    # GPT-2 has a learned table of n_positions rows: any longer sequence fails with IndexError. Every length left
    # at its default here exceeds it: block size (the tokenizer allows 128), --seq_kd_max_new_tokens (128),
    # --on_policy_max_new_tokens (64) and --report_max_new_tokens (32).
    positions = 20
    config = GPT2Config(
        vocab_size=len(lm_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=positions, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher_model = GPT2LMHeadModel(config)
    with torch.no_grad():
        teacher_model.lm_head.weight[lm_tokenizer.eos_token_id] = 0.0  # rarely stops: lengths reach the limit
    teacher = save_model(tmp_path / "teacher", teacher_model, lm_tokenizer)
    train, valid = prompt_completion_files
    out = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
        "--validation_file", valid, "--do_train", "--do_eval", "--seq_kd", "--lmbda", "0.5",
        "--seq_kd_cache_dir", str(tmp_path / "seq_kd"),
    ] + run_flags(out, max_steps=2) + ["--report_max_new_tokens", "32"]  # fmt: skip
    with CaptureLogger(generation_limits.logger) as limits_log, CaptureLogger(lm_seq_kd.logger) as seq_kd_log:
        with CaptureLogger(distill_lm.logger) as script_log, CaptureLogger(lm_report.logger) as report_log:
            results = distill_lm.main(argv)
    assert f"--block_size 128 exceeds the {positions} positions" in limits_log.out
    assert (
        "--seq_kd_max_new_tokens 128" in seq_kd_log.out
        and f"teacher's {positions} positions" in seq_kd_log.out
    )
    assert "--on_policy_max_new_tokens 64" in script_log.out
    assert "--report_max_new_tokens 32" in report_log.out
    cached = Dataset.load_from_disk(str(tmp_path / "seq_kd" / "data"))
    assert max(len(row) for row in cached["input_ids"]) <= positions
    assert math.isfinite(results["eval"]["perplexity"]) and len(results["report"]["generations"]) == 2
