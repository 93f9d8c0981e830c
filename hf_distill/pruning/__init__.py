"""Structured pruning that produces smaller, ordinary Hugging Face models (no masks left behind).

- `measure_importance` scores heads, FFN neurons, hidden channels and layers on calibration batches
  (activation-based, as Minitron: Muralidharan et al., 2024).
- `prune_model` slices heads, neurons, hidden width and layers by those scores into a new model whose config
  says its new shape (`check_pruning` / `pruned_config` check a spec against a config before any work).
- `prune_vocabulary` keeps only the tokens a task's data uses (`tokens_used`), with a tokenizer that maps the
  same text to the new ids.
"""

from hf_distill.pruning.importance import Importance, measure_importance
from hf_distill.pruning.structured import PruningSpec, check_pruning, prune_model, pruned_config
from hf_distill.pruning.vocabulary import check_vocabulary_keep, prune_vocabulary, tokens_used

__all__ = [
    "Importance",
    "PruningSpec",
    "check_pruning",
    "check_vocabulary_keep",
    "measure_importance",
    "prune_model",
    "prune_vocabulary",
    "pruned_config",
    "tokens_used",
]
