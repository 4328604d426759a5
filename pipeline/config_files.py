"""Config files as mappings: the YAML file, ``--set key=value`` overrides and their key-by-key merge into
defaults, with errors that name the dotted key. Shared by the pipeline's typed config (pipeline/config.py)
and the training config, which is why it knows nothing of either's keys."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

__all__ = ["ConfigError", "parse_overrides", "merge_config", "read_config_file", "plain", "as_mapping", "from_mapping"]


class ConfigError(ValueError):
    """An invalid configuration; ``key`` is the dotted key at fault."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid config: {key}: {reason}")
        self.key = key
        self.reason = reason


def parse_overrides(items: list[str] | None, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """``["model.batch_size=8", "align.enabled=false"]`` -> nested dict; values are parsed as YAML.
    ``error``: the ConfigError subclass raised (the training config has its own)."""
    import yaml  # here, not at import time: the GPU training script runs without PyYAML

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise error(item, "--set expects key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise error(key or item, "empty key in --set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise error(key, f"cannot parse value {raw!r}: {e}") from None
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise error(key, "conflicts with another --set")
            cur = nxt
        cur[parts[-1]] = value
    return out


def merge_config(base: dict, over: dict, error: type[ConfigError] = ConfigError, prefix: str = "") -> dict:
    """``over`` merged into ``base`` in place (nested mappings key by key); a key ``base`` does not have is an
    error naming it, with the closest known key."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise error(key, "unknown key" + _suggest(k, base))
        if isinstance(base[k], dict):
            if v is None:
                continue
            if not isinstance(v, dict):
                raise error(key, f"must be a mapping, got {type(v).__name__}")
            merge_config(base[k], v, error, key + ".")
        else:
            base[k] = v
    return base


def _suggest(k: str, base: dict) -> str:
    close = difflib.get_close_matches(k, list(base), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(base))})"


def read_config_file(path: str | None, error: type[ConfigError] = ConfigError) -> dict:
    """The YAML mapping in ``path`` ({} for no path); a missing or unparsable file is a ``--config`` error."""
    import yaml

    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise error("--config", f"file not found: {path}") from None
    except yaml.YAMLError as e:
        raise error("--config", f"not valid YAML: {e}") from None


def plain(obj: Any) -> Any:
    """Nested values as YAML and JSON write them: tuples as lists."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def as_mapping(config: Any) -> dict[str, Any]:
    """A typed config (a frozen dataclass whose sections are dataclasses) as the plain nested mapping a config
    file would write: sections as mappings, tuples as lists."""
    return plain(dataclasses.asdict(config))


def from_mapping(cls: type, mapping: dict[str, Any]) -> Any:
    """The typed config ``cls`` from a merged, validated mapping of its keys (``as_mapping``'s inverse): each
    section (a field with a default factory) built from its sub-mapping, lists frozen into tuples."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}

    def frozen(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    return cls(**{name: sections[name](**{k: frozen(v) for k, v in value.items()}) if name in sections else value
                  for name, value in mapping.items()})
