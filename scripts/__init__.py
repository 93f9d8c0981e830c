"""The command-line recipes, installed as `hf_distill.scripts` so that `hf-distill <command>`
(hf_distill/cli.py), `python -m hf_distill.scripts.<module>` and `accelerate launch -m ...` find them.
Each module is also run by path (`python scripts/distill_glue.py ...`) and exposes `main(argv)`."""
