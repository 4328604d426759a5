"""The configuration reference (docs/CONFIG.md, ``run_pipeline.py --help-config``), generated from the typed
config itself so that it cannot drift: every key of ``pipeline/config.py``'s dataclasses with its type and
default from the dataclass fields, and its meaning from the comment written beside the field (or, where
there is none beside it, the comment block right above it). A field without a comment is an error here, so a
key cannot be added undocumented; tests/pipeline/test_config.py checks docs/CONFIG.md against this output.

    python -m pipeline.config_reference --write docs/CONFIG.md
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from typing import Any

from . import config as config_module
from .config import PipelineConfig

__all__ = ["ConfigKey", "config_keys", "render_config_reference", "CONFIG_DOC"]

CONFIG_DOC = "docs/CONFIG.md"


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str        # dotted, as --set and YAML files name it
    type: str       # the field's annotation
    default: Any    # as a config file would write it
    meaning: str


def _comments(source: str) -> dict[int, tuple[int, str]]:
    """line number -> (column, text) of each comment in ``source``."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    return out


def _field_meanings(source: str) -> dict[str, dict[str, str]]:
    """class name -> field name -> the comment beside it (and its continuation lines), or the block above it."""
    lines = source.splitlines()
    comments = _comments(source)

    def comment_only(n: int) -> bool:
        return 1 <= n <= len(lines) and lines[n - 1].strip().startswith("#")

    out: dict[str, dict[str, str]] = {}
    for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
        fields = out.setdefault(cls.name, {})
        for node in cls.body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            beside = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            parts = [text for _, text in beside]
            if beside:  # continued on comment-only lines indented past the field
                n = node.end_lineno + 1
                while comment_only(n) and comments[n][0] > node.col_offset:
                    parts.append(comments[n][1])
                    n += 1
            else:
                n, above = node.lineno - 1, []
                while comment_only(n) and comments[n][0] == node.col_offset:
                    above.insert(0, comments[n][1])
                    n -= 1
                parts = above
            fields[node.target.id] = " ".join(parts)
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_keys() -> list[ConfigKey]:
    """Every key of the pipeline's config, in the order of the dataclasses; ValueError for one without a comment."""
    meanings = _field_meanings(inspect.getsource(config_module))
    keys: list[ConfigKey] = []
    undocumented: list[str] = []

    def add(cls: type, prefix: str, instance: Any) -> None:
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                add(type(value), f"{prefix}{f.name}.", value)
                continue
            meaning = meanings.get(cls.__name__, {}).get(f.name, "")
            if not meaning:
                undocumented.append(prefix + f.name)
            keys.append(ConfigKey(prefix + f.name, str(f.type), _plain(value), meaning))

    add(PipelineConfig, "", PipelineConfig())
    if undocumented:
        raise ValueError(f"config keys without a comment in pipeline/config.py: {', '.join(undocumented)}")
    return keys


def _cell(text: str) -> str:
    # Markdown: a pipe ends the cell, and <key> would be read as an HTML tag.
    return text.replace("|", "\\|").replace("<", "\\<")


def render_config_reference() -> str:
    """docs/CONFIG.md's text."""
    out = ["# Configuration reference", "",
           "Generated from `pipeline/config.py` (the typed config: the dataclasses' fields, types and defaults, and",
           "the comment beside each field) by `python -m pipeline.config_reference --write docs/CONFIG.md`; also",
           "printed by `run_pipeline.py --help-config`. `tests/pipeline/test_config.py` fails when this file is out of",
           "date.",
           "",
           "Set keys in a YAML file (`--config configs/x.yaml`, sections as nested mappings) or one at a time with",
           "`--set dotted.key=value` (values parsed as YAML: `null`, `true`, numbers, `[a, b]`, `{k: v}`). Every key",
           "has the default below; a file names only what it changes. An invalid value is refused before anything",
           "runs, naming the key (exit 2).", ""]
    sections: dict[str, list[ConfigKey]] = {}
    for k in config_keys():  # the sections in the config's order, then the top-level keys
        sections.setdefault(k.key.split(".")[0] if "." in k.key else "", []).append(k)
    for head, keys in sorted(sections.items(), key=lambda item: item[0] == ""):
        out += ["", f"## {head or 'top level'}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys:
            type_cell = k.type.replace("|", "\\|")
            out.append(f"| `{k.key}` | `{type_cell}` | `{json.dumps(k.default)}` | {_cell(k.meaning)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print (or write) the configuration reference.")
    ap.add_argument("--write", metavar="PATH", help=f"write it to PATH (the repository's copy: {CONFIG_DOC})")
    args = ap.parse_args(argv)
    text = render_config_reference()
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
