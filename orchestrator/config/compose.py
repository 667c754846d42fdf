"""Compose the Hydra config tree in ``conf/`` into a typed :class:`Config`.

We use Hydra's compose API rather than ``@hydra.main`` so that the entry owns its error
messages (a bad override names the key and lists the valid keys or options), can be
called in-process by tests and launchers, and never changes the working directory.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.schema import GROUP_SCHEMAS, Config
from orchestrator.errors import ConfigError

DEBUG_OVERLAYS = ("stage", "method")
# Keys that moved to a group of their own: old key (or prefix) -> new key. Using an old one
# fails with one line saying where it went, instead of a generic "unknown key".
MOVED = {
    "stage.rollout": "rollout",
    "stage.eval_samples": "eval.samples",
    "stage.eval_every": "eval.every_steps",
    "stage.eval_reward": "eval.reward",
}


def conf_dir() -> Path:
    """The config tree: $ORCHESTRATOR_CONF, else ``conf/`` beside the package."""
    env = os.environ.get("ORCHESTRATOR_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"config tree not found at {path} (no config.yaml). Install the project with "
            "`pip install -e .` from its checkout, or set ORCHESTRATOR_CONF to its conf/ directory."
        )
    return path


def register_schemas() -> None:
    """Store every schema of GROUP_SCHEMAS in Hydra's ConfigStore (again on each compose, so
    an option registered at run time, e.g. by a plugin or a test, is found)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, options in GROUP_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def _order_overrides(overrides: Sequence[str]) -> list[str]:
    """`debug=X` shrinks whatever experiment is selected, so it must merge after it.

    Experiments are appended with `+experiment=`; a plain `debug=` would be merged
    before them. We turn it into an append placed last, so the user can write either.
    """
    normal, debug = [], []
    for item in overrides:
        m = re.match(r"^\+?((?:debug|debug_stage|debug_method)(?:/[\w.-]+)?)=(.*)$", item)
        (debug if m else normal).append(f"+{m.group(1)}={m.group(2)}" if m else item)
    return normal + debug


def _debug_overlay(choices, group: str) -> str | None:
    """The override applying debug=D's overlay for the chosen `group` option, if it has one:
    conf/debug_<group>/<option>.yaml for debug=cpu, conf/debug_<group>/<D>/<option>.yaml for
    any other D (debug=cpu_real shrinks the stages differently for a pretrained model)."""
    debug = choices.get("debug")
    if not debug:
        return None
    sub = f"debug_{group}" if debug == "cpu" else f"debug_{group}/{debug}"
    return f"+{sub}={choices[group]}" if (conf_dir() / sub / f"{choices[group]}.yaml").is_file() else None


def moved(key: str) -> str | None:
    """'stage.rollout.n moved to rollout.n' when `key` (or a parent of it) moved, else None."""
    key = key.lstrip("+~")
    for old, new in MOVED.items():
        if key == old and "." not in new:  # a whole block, as a YAML file writes it
            return f"{key} moved to {new} ({old}.X is now {new}.X)"
        if key == old or key.startswith(old + "."):
            return f"{key} moved to {new}{key[len(old) :]}"
    return None


def _check_moved(overrides: Sequence[str]) -> None:
    for item in overrides:
        hint = moved(item.split("=", 1)[0])
        if hint:
            raise ConfigError(hint)


def group_options(group: str) -> list[str]:
    path = conf_dir() / group
    return sorted(p.stem for p in path.glob("*.yaml")) if path.is_dir() else []


def _explain(exc: Exception, overrides: Sequence[str]) -> str:
    """Turn Hydra/OmegaConf errors into one message naming the key and the valid values."""
    msg = str(exc).strip()
    if exc.__cause__ is not None:  # Hydra wraps the OmegaConf error that names the key
        msg = f"{msg}: {str(exc.__cause__).strip()}"
    key_m = re.search(r"full_key:\s*(\S+)", msg)
    missing_key = re.search(r"Key '([^']+)' (?:is )?not in", msg) or re.search(r"Could not override '([^']+)'", msg)
    lines = [msg.splitlines()[0]]
    if msg.startswith("In '"):  # raised inside a config file: keep its reason (next line)
        lines = [" ".join(x.strip() for x in msg.splitlines()[:2])]
    if "issing mandatory value" in msg and key_m:
        return (
            f"'{key_m.group(1)}' is required and has no default: set it on the command line, e.g. {key_m.group(1)}=..."
        )
    full_key = key_m.group(1) if key_m else None
    if missing_key and full_key is None:
        full_key = missing_key.group(1)
    if full_key and moved(full_key):
        return moved(full_key)
    enum_m = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", msg)
    if full_key and enum_m:
        return f"{full_key}={enum_m.group(1)!r} is not valid. Valid values: {enum_m.group(2)}"
    if full_key and missing_key:
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys(parent, overrides)
        if valid:
            close = difflib.get_close_matches(leaf, valid, n=1)
            hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
            lines.append(
                f"unknown key '{full_key}'.{hint} Valid keys under '{parent or '<root>'}': " + ", ".join(valid)
            )
        owners = [
            f"{parent}={name}"
            for name, node in GROUP_SCHEMAS.get(parent, {}).items()
            if leaf in getattr(node, "__dataclass_fields__", {})
        ]
        if owners:
            lines.append(
                f"'{leaf}' belongs to {' / '.join(owners)}; select that option, or drop the key with ~{full_key}."
            )
    elif full_key:
        lines = [f"bad value for '{full_key}': {msg.split(': ', 1)[-1].splitlines()[0]}"]
    group_m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if group_m:
        group, opt = group_m.groups()
        opts = group_options(group)
        close = difflib.get_close_matches(opt, opts, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        lines = [f"'{opt}' is not an option of config group '{group}'.{hint} Valid options: {', '.join(opts)}"]
    return "\n".join(lines)


def _valid_keys(parent: str, overrides: Sequence[str]) -> list[str]:
    """Keys of the node at `parent`, composed without the offending overrides."""
    groups = (*GROUP_SCHEMAS, "experiment", "debug")
    safe = [o for o in overrides if "=" in o and "." not in o.split("=")[0] and o.split("=")[0].lstrip("+~") in groups]
    try:
        cfg = _compose_raw(safe)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(node.keys()) if node is not None and hasattr(node, "keys") else []
    except Exception:  # noqa: BLE001 (best effort: the original message is still shown)
        return []


def _compose_raw(overrides: Sequence[str]):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(
            config_name="config",
            overrides=_order_overrides(overrides),
            return_hydra_config=True,
        )


def compose(overrides: Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """Compose `overrides` into a typed Config and the chosen option of each group."""
    overrides = list(overrides)
    _check_moved(overrides)
    try:
        raw = _compose_raw(overrides)
        choices = raw.hydra.runtime.choices
        # debug=X also applies conf/debug_<group>/<choice>.yaml for the chosen stage and method
        # when it exists (a CPU-sized rollout for GRPO, a tiny MoE for method=experts). Hydra
        # cannot interpolate a group choice into a non-primary defaults list, so we compose a
        # second time with them appended last.
        extra = [o for g in DEBUG_OVERLAYS if (o := _debug_overlay(choices, g))]
        if extra:
            raw = _compose_raw(overrides + extra)
        choices = {
            k: v
            for k, v in OmegaConf.to_container(raw.hydra.runtime.choices).items()
            if not k.startswith(("hydra", "schema", *(f"debug_{g}/" for g in DEBUG_OVERLAYS)))
        }
        with open_dict(raw):
            del raw["hydra"]
            raw.pop("debug", None)  # the debug groups are `@package _global_`; nothing lands here
            for g in DEBUG_OVERLAYS:
                raw.pop(f"debug_{g}", None)
        _reject_added_keys(raw)
        cfg = OmegaConf.to_object(raw)
    except ConfigError:
        raise
    except (OmegaConfBaseException, Exception) as exc:  # Hydra raises several types
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise ConfigError(_explain(exc, overrides)) from exc
    return cfg, choices


def _reject_added_keys(raw) -> None:
    """`+group.key=v` bypasses the struct check; a key the group's dataclass lacks would
    then be dropped silently by to_object. Refuse it with the same message as without +."""
    import dataclasses

    for group in raw:
        node = raw[group]
        typ = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        if typ is None or not dataclasses.is_dataclass(typ):
            continue
        fields = {f.name for f in dataclasses.fields(typ)}
        for key in node:
            if key not in fields:
                owners = [
                    f"{group}={name}"
                    for name, sch in GROUP_SCHEMAS.get(group, {}).items()
                    if key in {f.name for f in dataclasses.fields(sch)}
                ]
                hint = f" '{key}' belongs to {' / '.join(owners)}." if owners else ""
                raise ConfigError(
                    f"unknown key '{group}.{key}' for {typ.__name__}.{hint} Valid keys under "
                    f"'{group}': {', '.join(sorted(fields))}"
                )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
