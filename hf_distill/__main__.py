"""`python -m hf_distill <command> ...`: the same as the `hf-distill` command (hf_distill/cli.py)."""

from hf_distill.cli import main

if __name__ == "__main__":
    main()
