"""`hf-distill <command> ...`: one console command for the recipes in scripts/, as `trl sft ...` is for TRL.

    hf-distill glue --teacher_model_name_or_path outputs/teacher --student_num_layers 2 ... --output_dir out
    hf-distill lm run.yaml                              # one YAML/JSON file standing for all the flags
    hf-distill glue --help                              # the flags of scripts/distill_glue.py
    accelerate launch -m hf_distill.cli glue run.yaml   # the same under Accelerate (python -m hf_distill works too)

A command hands the rest of the command line, unchanged, to its script's `main(argv)`, so it takes exactly the
flags and config files that `python scripts/<script>.py` takes. The scripts are installed as `hf_distill.scripts`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from hf_distill.version import __version__

PROG = "hf-distill"


class Command(NamedTuple):
    module: str  # a module of hf_distill.scripts, i.e. scripts/<module>.py
    summary: str


COMMANDS: dict[str, Command] = {
    "glue": Command("distill_glue", "distil a sequence-classification teacher (GLUE or local files)"),
    "lm": Command("distill_lm", "distil a causal LM (live or cached teacher, seq-KD, on-policy, LoRA)"),
    "translation": Command("distill_translation", "distil an encoder-decoder translation model"),
    "teacher": Command("train_teacher", "fine-tune a sequence-classification teacher for `glue`"),
    "cache-logits": Command(
        "cache_teacher_logits",
        "cache teachers' top-k log-probabilities (LM, cross-tokenizer, several teachers, classifiers)",
    ),
    "compress": Command(
        "compress",
        "prune, distil, quantize a classifier, causal LM or translator in stages; report every stage",
    ),
    "demo-bbc": Command("demo_bbc", "offline demo on BBC News: fine-tune a teacher, distil it, report"),
    "online": Command("distill_online", "distil on a stream of chunks; the teacher refreshed every N"),
    "embeddings": Command(
        "distill_embeddings",
        "distil a sentence-transformers teacher's embeddings (cut, pruned, INT8 students)",
    ),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS) + 2
    listing = "\n".join(
        f"  {name:<{width}}{command.summary} (scripts/{command.module}.py)"
        for name, command in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} <command> [flags of its script | one .yaml/.json file with them]",
        description=(
            "Knowledge distillation for Hugging Face transformers: the recipes of scripts/ as commands.\n\n"
            f"commands:\n{listing}"
        ),
        epilog=(
            f"`{PROG} <command> --help` lists a command's flags, those of its script.\n"
            "Under Accelerate: accelerate launch [--config_file ...] -m hf_distill.cli <command> ..."
        ),
        # The listing keeps one line per command.
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Listed in the description; what follows the command is parsed by its script, never here.
    parser.add_argument("command", metavar="<command>", choices=list(COMMANDS), help=argparse.SUPPRESS)
    return parser


def run(command: str, argv: Sequence[str] = ()) -> Any:
    """Run `hf-distill <command> *argv` in this process and return what the script's `main` returns."""
    if command not in COMMANDS:
        raise ValueError(f"Unknown command {command!r}; the commands are {', '.join(COMMANDS)}.")
    module = importlib.import_module(f"hf_distill.scripts.{COMMANDS[command].module}")
    argv = list(argv)
    saved_argv = sys.argv
    # argparse names the program after sys.argv[0]: the script's usage and errors then read `hf-distill glue`.
    sys.argv = [f"{PROG} {command}", *argv]
    try:
        return module.main(argv)
    finally:
        sys.argv = saved_argv


def main(argv: Sequence[str] | None = None) -> None:
    """The `hf-distill` console command: `hf-distill <command> [flags | config file]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first word; everything after it, --help included, belongs to the script. Only a
    # leading option (--help, --version, a typo) or a missing command is handled here.
    head = argv if not argv or argv[0].startswith("-") else argv[:1]
    command = _parser().parse_args(head).command
    # A console script exits with main's return value: the script's results dict must not become it.
    run(command, argv[1:])
    from hf_distill.training.processes import finish_processes  # imported here: `--help` stays light

    finish_processes()


if __name__ == "__main__":
    main()
