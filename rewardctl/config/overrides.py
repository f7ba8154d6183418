"""Command-line overrides checked before Hydra runs a command: one line per mistake, with a "did you
mean", and the exit status of every other config error (2).

Hydra reports an unknown key, an unknown group option or a value of the wrong type in 6-12 lines
(search path, object types) and exits 1, and it accepts ``+train.lrr=1e-3`` (the fix its own message
suggests for a typo), after which the run trains with a key nothing reads. Here the overrides are
composed once through Hydra's compose API first; a failure is turned into a ``ConfigError`` naming
the key. ``+key=value`` is refused unless ``key`` lands in a free-form mapping (``data.columns``,
``method.weights``, ``hydra.*``) or in a method/adapter node that its own schema checks afterwards.
"""

from __future__ import annotations

import difflib
from typing import Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rewardctl.config.validate import explain_value_error
from rewardctl.errors import ConfigError

CONFIG_MODULE = "rewardctl.conf"
# Nodes typed only after composition, by the schema their content names (their checks come later).
LATE_TYPED = ("method", "peft")


def check_overrides(config_name: str, overrides: list[str], *, sweep: bool = False) -> None:
    """Raises ``ConfigError`` for the first bad override. In a sweep (``sweep``) a swept value
    (``a,b``, ``range(...)``) is left to each job's own composition; the fixed ones are checked here,
    unless a config group is swept (its options' keys differ: each job checks its own)."""
    swept = [o for o in overrides if sweep and is_swept(o)]
    if any("." not in o.partition("=")[0] for o in swept):
        return
    fixed = [o for o in overrides if o not in swept]
    _compose_or_explain(config_name, fixed)
    _check_group_choices(fixed)
    additions = [o for o in fixed if o.startswith("+")]
    if not additions:  # the common case: one composition at start-up, not two
        return
    base = _compose_quietly(config_name, [o for o in fixed if o not in additions])
    for addition in additions:
        _check_addition(addition, base)


def _check_group_choices(overrides: list[str]) -> None:
    """``data=ultrafeedbak``: an optional group (``data``, ``experiment``) drops an option that does not
    exist without a word, so every ``group=option`` is checked against the group's options here.
    Skipped when ``hydra.searchpath`` adds folders (their options are not listed here)."""
    if any(o.startswith("hydra.searchpath") for o in overrides):
        return
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for override in overrides:
            group, _, option = override.partition("=")
            group = group.lstrip("+~")
            if "." in group or group.startswith("hydra") or not option or option == "null":
                continue
            options = loader.get_group_options(group)
            if options and option not in options:
                hint = _did_you_mean(option, options, group + "=")
                raise ConfigError(
                    override, f"{group} has no option {option!r}{hint} (options: {', '.join(sorted(options))})"
                )


def is_swept(override: str) -> bool:
    value = override.partition("=")[2]
    return "," in value or value.split("(")[0] in ("range", "choice", "glob", "interval", "tag", "shuffle", "sort")


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _compose_quietly(config_name: str, overrides: list[str]) -> DictConfig | None:
    try:
        return _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException):
        return None


def _compose_or_explain(config_name: str, overrides: list[str]) -> None:
    try:
        _compose(config_name, overrides)
    except MissingConfigException as exc:
        raise _unknown_option(exc, overrides) from None
    except OverrideParseException as exc:
        raise ConfigError(exc.override, _first_line(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise _explained(exc, config_name, overrides) from None


def _unknown_option(exc: MissingConfigException, overrides: list[str]) -> ConfigError:
    """``method=foo``: the group, the nearest options and all of them."""
    missing = exc.missing_cfg_file or ""
    group, _, option = missing.rpartition("/")
    options = sorted(exc.options or [])
    if not group or not options:
        return ConfigError("config", _first_line(exc))
    typed = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == group), f"{group}={option}")
    return ConfigError(
        typed,
        f"{group} has no option {option!r}{_did_you_mean(option, options, group + '=')} "
        f"(options: {', '.join(options)})",
    )


def _explained(exc: Exception, config_name: str, overrides: list[str]) -> ConfigError:
    """An unknown key (with the nearest known keys) or a value of the wrong type, named by its key."""
    cause = exc.__cause__ or exc.__context__ or exc
    key = getattr(cause, "full_key", None) or getattr(exc, "full_key", None)
    if not key:
        return ConfigError("config", _first_line(exc))
    text = str(cause)
    if "not in" in text or "is not in struct" in text:
        parent, _, leaf = key.rpartition(".")
        others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
        known = _keys_at(_compose_quietly(config_name, others), parent)
        hint = _did_you_mean(leaf, known, f"{parent}." if parent else "")
        return ConfigError(key, f"no such key{hint}")
    return ConfigError(key, explain_value_error(key, _first_line(cause)))


def _check_addition(addition: str, base: DictConfig | None) -> None:
    """``+key=value`` adds a key: only where keys are free-form, never a typo'd setting. A key
    without a dot adds a config group (e.g. one from ``hydra.searchpath``): Hydra checks those."""
    key = addition.lstrip("+").split("=", 1)[0]
    if base is None or "." not in key or key.startswith("hydra.") or key.split(".")[0] in LATE_TYPED:
        return
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):  # the nearest existing ancestor decides
        node = OmegaConf.select(base, ".".join(parts[:depth]))
        if node is None:
            continue
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
            return  # inside a Dict[str, ...] field such as data.columns or model.config_overrides
        if isinstance(node, DictConfig) and depth == len(parts) - 1 and parts[-1] in node:
            return  # `+` over an existing key: Hydra's own message covers it
        break
    parent, _, leaf = key.rpartition(".")
    hint = _did_you_mean(leaf, _keys_at(base, parent), f"{parent}." if parent else "")
    raise ConfigError(
        addition.split("=", 1)[0],
        f"adds a key no setting reads{hint}; `+` adds keys only inside free-form mappings such as data.columns "
        "(drop the `+` to set a key)",
    )


def _keys_at(cfg: DictConfig | None, parent: str) -> list[str]:
    if cfg is None:
        return []
    node: Any = OmegaConf.select(cfg, parent) if parent else cfg
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _did_you_mean(word: str, candidates: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, candidates, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
