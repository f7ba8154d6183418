"""Whether hooks run around a module's call: rewardctl's faster forwards call a module's parts directly.

The gathered decoder and encoder forwards (``unpadded_decoder``, ``unpadded_encoder``), the last layer
at the reads (``final_layer``) and the encoder's last layer at its first token (``first_token_layer``)
compute a layer from its projections, norms and MLP, so the layer's (and its attention module's) own
``__call__`` never runs, and the read-only last layer stops the backbone's call inside its forward:
hooks there would be skipped. Each of them asks ``hooked_module`` first and
runs the stock forward where a hook sits. Two kinds count: torch hooks (a user's forward, pre-forward
or backward hooks) and accelerate's (offload and device-map hooks replace the module's ``forward`` and
leave ``_hf_hook``, no torch hook). transformers' own output-capturing hooks do not: they record only
inside a forward that asks for hidden states or attentions, which goes to the stock forward anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

#: transformers 5 installs these forward hooks on every layer and attention module the first time a
#: forward asks for hidden states or attentions (``install_output_capuring_hook``) and leaves them
#: there; they record only inside a forward that asks for those outputs, which the faster forwards
#: leave to the stock one (``read_slots.needs_stock_forward``; a reward model returns rewards only).
#: Counting them as hooks turned the gathered forward off for the rest of a run after one such call:
#: BCO's prompt embeddings (``output_hidden_states``) did, until this was excluded.
OUTPUT_CAPTURING_HOOKS = "transformers.utils.output_capturing"
#: FSDP2's ``fully_shard`` hooks (defined under this package): a pre-forward hook that gathers a wrapped
#: layer's weights and wraps its inputs so the gradients are reduce-scattered once the backward reaches
#: them, and a post-forward hook that reshards and closes the layer's forward. Where the layer's call is
#: stopped after its pre-hooks (``final_layer``), the read-only layer replays the post-forward hook on
#: its own output (``final_layer.close_stopped_call``: exact under two-process FSDP2,
#: ``tests/e2e/test_distributed_runs.py``), so neither counts there. Where the layer's whole call is
#: skipped, they count.
FSDP_HOOKS = "torch.distributed.fsdp."

#: How the log names the gathered decoder and encoder forwards (``unpadded_decoder``,
#: ``unpadded_encoder``), which skip every layer's call.
GATHERED = "the gathered forward"


def _defined_in(hook: object, prefixes: tuple[str, ...]) -> bool:
    return str(getattr(hook, "__module__", None)).startswith(prefixes)


def sharding_forward_hooks(module: nn.Module) -> list[tuple[Callable[..., Any], bool]]:
    """FSDP2's post-forward hooks on ``module``, each with whether it takes the call's keywords."""
    return [
        (hook, key in module._forward_hooks_with_kwargs)
        for key, hook in module._forward_hooks.items()
        if _defined_in(hook, (FSDP_HOOKS,))
    ]


def hooked(module: nn.Module, *, pre_hooks_run: bool = False, sharding_replayed: bool = False) -> bool:
    """Whether hooks that a faster forward would skip sit on ``module``: torch forward, pre-forward or
    backward hooks (transformers' output-capturing ones aside), or an accelerate hook (``_hf_hook``,
    whose work is in the replaced ``forward``). ``pre_hooks_run``: the module's ``__call__`` runs its
    pre-forward hooks before the faster forward takes over (``final_layer``), so those do not count;
    ``sharding_replayed``: nor do FSDP2's post-forward hooks, which the faster forward replays on its
    own output (``FSDP_HOOKS``)."""
    if hasattr(module, "_hf_hook"):
        return True
    hooks = [*module._forward_hooks.values(), *module._backward_hooks.values(), *module._backward_pre_hooks.values()]
    if not pre_hooks_run:
        hooks += module._forward_pre_hooks.values()
    ignored = (OUTPUT_CAPTURING_HOOKS, FSDP_HOOKS) if sharding_replayed else (OUTPUT_CAPTURING_HOOKS,)
    return any(not _defined_in(hook, ignored) for hook in hooks)


def hooked_module(
    modules: Iterable[nn.Module], forward: str, *, pre_hooks_run: bool = False, sharding_replayed: bool = False
) -> str | None:
    """Why ``forward`` (named for the log, e.g. "the gathered forward"), which calls these modules'
    parts directly, must not run: "hooks on <class> (<forward> would skip them)" for the first
    ``hooked`` one, or None."""
    flags = {"pre_hooks_run": pre_hooks_run, "sharding_replayed": sharding_replayed}
    found = next((module for module in modules if hooked(module, **flags)), None)
    return None if found is None else f"hooks on {type(found).__name__} ({forward} would skip them)"
