"""Whether transformers will save and reload a pruned config, checked before any pruning work.

A pruned shape can be consistent for the modelling code and still be refused by the config class: transformers 5's
`LlamaConfig.validate_architecture` requires `hidden_size % num_attention_heads == 0` even though Llama's
`head_dim` is explicit, while Mistral, Qwen2 and Qwen3 accept the same shapes. `save_pretrained` and
`from_pretrained` run that validation, so such a model is pruned (minutes of importance measurement) and then
fails to save. `check_config_saves` runs the same validation and round trip on the config alone and, when it
fails, names the head counts and widths the config class does accept.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig

__all__ = ["check_config_saves", "config_refusal"]

# How far from the requested width to look for one the config class accepts (its step is the head count).
_WIDTH_SEARCH = 4096


def config_refusal(config: PretrainedConfig) -> str | None:
    """Why transformers would refuse `config` at `save_pretrained` or `from_pretrained` (None when it accepts it):
    the config class's own validation, then the to_dict / from_dict round trip a reload performs."""
    try:
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        type(config).from_dict(config.to_dict())
    # Any exception here is one that save_pretrained / from_pretrained would raise (huggingface_hub's strict
    # dataclass errors are not ValueErrors), so all are reported.
    except Exception as error:  # noqa: BLE001
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(error).__name__
    return None


def check_config_saves(
    build: Callable[[int, int], PretrainedConfig],
    *,
    groups_kept: int,
    groups: int,
    heads_per_group: int,
    hidden: int,
    max_hidden: int,
    what: str,
) -> None:
    """Raise ValueError if `build(groups_kept, hidden)`, the pruned config, would not save and reload.

    build: (key/value groups kept, hidden width) -> the pruned config; groups: the groups before pruning;
    heads_per_group: query heads per group; max_hidden: the width before pruning; what: the spec, for the message.
    The message names the `heads` ratios that save at this width and the nearest widths that save with these
    heads.
    """
    reason = config_refusal(build(groups_kept, hidden))
    if reason is None:
        return
    heads = groups_kept * heads_per_group
    class_name = type(build(groups_kept, hidden)).__name__
    ratios = [
        f"heads: {(groups - kept) / groups:.4g} ({kept * heads_per_group} heads)"
        for kept in range(groups, 0, -1)
        if kept != groups_kept and config_refusal(build(kept, hidden)) is None
    ]
    below = next(
        (
            h
            for h in range(hidden - 1, max(hidden - _WIDTH_SEARCH, 0), -1)
            if config_refusal(build(groups_kept, h)) is None
        ),
        None,
    )
    above = next(
        (
            h
            for h in range(hidden + 1, min(hidden + _WIDTH_SEARCH, max_hidden) + 1)
            if config_refusal(build(groups_kept, h)) is None
        ),
        None,
    )
    widths = [f"hidden: {h}" for h in (below, above) if h is not None]
    fixes = []
    if ratios:
        fixes.append(f"with hidden {hidden}, use {' or '.join(ratios)}")
    if widths:
        fixes.append(f"with {heads} heads, use {' or '.join(widths)} (the nearest widths it accepts)")
    fix = "; ".join(fixes) if fixes else "no head count or width near it is accepted; prune less"
    raise ValueError(
        f"{what} gives a {class_name} with hidden_size {hidden} and {heads} attention heads, which transformers "
        f"refuses to save or load ({reason}); {fix}."
    )
