"""Structured pruning that produces smaller, ordinary Hugging Face models (no masks left behind).

- `measure_importance` scores heads, FFN neurons, hidden channels and layers on calibration batches
  (activation-based, as Minitron: Muralidharan et al., 2024).
- `prune_model` slices heads, neurons, hidden width and layers by those scores into a new model whose config
  says its new shape (`check_pruning` / `pruned_config` check a spec against a config before any work).
- `prune_vocabulary` keeps only the tokens a task's data uses (`tokens_used`, every word truncation cuts kept
  whole), with a tokenizer that maps the same text to the new ids, saved under a class name transformers 4 loads
  too (`make_tokenizer_folder_portable` fixes a folder a reloaded tokenizer was saved into).

Modules: families (architectures), importance, structured, saved_config (will transformers save the pruned config),
data_vocabulary, tokenizer_vocabulary, vocabulary, portable_tokenizer. They import transformers, tokenizers, torch
and hf_distill's student and atomic modules, nothing above them.
"""

from hf_distill.compression.pruning.importance import Importance, measure_importance
from hf_distill.compression.pruning.portable_tokenizer import make_tokenizer_folder_portable
from hf_distill.compression.pruning.structured import PruningSpec, check_pruning, prune_model, pruned_config
from hf_distill.compression.pruning.vocabulary import check_vocabulary_keep, prune_vocabulary, tokens_used

__all__ = [
    "Importance",
    "PruningSpec",
    "check_pruning",
    "check_vocabulary_keep",
    "make_tokenizer_folder_portable",
    "measure_importance",
    "prune_model",
    "prune_vocabulary",
    "pruned_config",
    "tokens_used",
]
