"""The README's commands work as written: every fenced block marked ``<!-- readme-test: GROUP -->`` runs, in the
README's order, in a fresh folder that sees the checkout (its files linked, no ``out/``); a group's blocks
share that folder, so a later block reads what an earlier one wrote. Shell blocks run under bash -eu -o
pipefail, Python blocks with this interpreter. A group named here gets checks of what it must have made; any
other group (the training command's, say) must run without error. The run_pipeline.py docstring's reading
snippet runs on the demo's output too."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

import run_pipeline
from helpers.paths import REPO_ROOT

README = os.path.join(REPO_ROOT, "README.md")
MARKED_BLOCK = re.compile(r"^<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.S | re.M)
LANGUAGES = {"sh": "shell", "bash": "shell", "shell": "shell", "python": "python"}
NOT_LINKED = {"out", ".git", ".pytest_cache"}
BLOCK_TIMEOUT_S = 900


def readme_blocks(text: str) -> dict[str, list[tuple[str, str]]]:
    """group -> [(shell | python, code)] in the README's order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for group, lang, code in MARKED_BLOCK.findall(text):
        if lang not in LANGUAGES:
            raise ValueError(f"readme-test block of group {group!r} in {lang!r}: only {sorted(LANGUAGES)} run")
        groups.setdefault(group, []).append((LANGUAGES[lang], code))
    return groups


def _blocks() -> dict[str, list[tuple[str, str]]]:
    with open(README, encoding="utf-8") as f:
        return readme_blocks(f.read())


def fresh_folder(tmp_path) -> str:
    """A folder that looks like a fresh checkout (every top-level entry linked) with no outputs yet."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in os.listdir(REPO_ROOT):
        if name not in NOT_LINKED:
            os.symlink(os.path.join(REPO_ROOT, name), work / name)
    return str(work)


def run_block(kind: str, code: str, cwd: str) -> subprocess.CompletedProcess:
    args = ["bash", "-euo", "pipefail", "-c", code] if kind == "shell" else [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def docstring_snippet(doc: str, after: str) -> str:
    """The indented block that follows the line starting with ``after`` in a docstring."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after)) + 1
    while not lines[start].strip():
        start += 1
    end = start
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    return textwrap.dedent("\n".join(lines[start:end]))


def _mean_brightness(tar_bytes: bytes) -> dict[str, float]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            out[m.name] = float(np.asarray(Image.open(tf.extractfile(m)).convert("L"), np.float64).mean())
    return out


def _check_demo(work: str, outputs: list[str]) -> None:
    assert os.path.exists(os.path.join(work, "out", "demo", "_SUCCESS"))
    assert os.path.exists(os.path.join(work, "out", "demo_brightness", "_SUCCESS"))
    assert "(16, 10, 32)" in outputs[-1], outputs[-1]   # the reading snippet's codes: n_latent 10, style_dim 32
    # The shipped direction does what the README says on the demo's own latents: +alpha brighter, -alpha darker.
    with open(os.path.join(work, "out", "demo_brightness", "images", "demo-000000.tar"), "rb") as f:
        bright = _mean_brightness(f.read())
    keys = {name.split(".edit_")[0] for name in bright}
    assert len(keys) == 16
    for k in keys:
        assert bright[f"{k}.edit_brightness_0.3.jpg"] > bright[f"{k}.edit_brightness_-0.3.jpg"] + 10, k
    # The run_pipeline.py docstring's snippet reads the same output.
    proc = run_block("python", docstring_snippet(run_pipeline.__doc__, "Reading the outputs"), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(16, 10, 32)" in proc.stdout


CHECKS = {"demo": _check_demo}   # group -> what its blocks must have made (other groups: that they run)
# Marked commands another test runs its own way: the training commands (indented blocks; "starts" runs until
# the first training step is logged, not to the end).
OTHER_HARNESSES = {"runs": "tests/pipeline/training/test_train.py", "starts": "tests/pipeline/training/test_train.py"}


def test_readme_marks_the_demo_walkthrough():
    groups = _blocks()
    kinds = [kind for kind, _ in groups["demo"]]
    assert kinds[0] == "shell" and "python" in kinds
    assert "e2style edit --latents out/demo" in groups["demo"][0][1]
    assert "--direction brightness=demo/directions/brightness.npy" in groups["demo"][0][1]


def test_every_readme_mark_is_run_by_some_test():
    """A mark this harness cannot parse (not followed by a fenced block) belongs to another harness, or it fails."""
    with open(README, encoding="utf-8") as f:
        marks = re.findall(r"^<!-- readme-test: ([\w-]+) -->$", f.read(), re.M)
    parsed = [group for group, blocks in _blocks().items() for _ in blocks]
    unparsed = list(marks)
    for group in parsed:
        unparsed.remove(group)
    assert [g for g in unparsed if g not in OTHER_HARNESSES] == []


def test_readme_block_parser():
    text = ("x\n<!-- readme-test: a -->\n```sh\necho 1 \\\n  2\n```\n"
            "```sh\nnot marked\n```\n<!-- readme-test: b -->\n```python\nprint(3)\n```\n"
            "<!-- readme-test: a -->\n```bash\necho 4\n```\n")
    assert readme_blocks(text) == {"a": [("shell", "echo 1 \\\n  2\n"), ("shell", "echo 4\n")],
                                   "b": [("python", "print(3)\n")]}
    with pytest.raises(ValueError, match="only"):
        readme_blocks("<!-- readme-test: c -->\n```yaml\na: 1\n```\n")


def test_docstring_snippet_extraction():
    doc = "Title.\n\nReading:\n\n    a = 1\n\n    print(a)\nAfter.\n"
    assert docstring_snippet(doc, "Reading") == "a = 1\n\nprint(a)"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(_blocks()))
def test_readme_commands_run_as_written(group, tmp_path):
    work = fresh_folder(tmp_path)
    outputs = []
    for kind, code in _blocks()[group]:
        proc = run_block(kind, code, work)
        assert proc.returncode == 0, f"README block failed ({group}):\n{code}\n--- stderr:\n{proc.stderr[-4000:]}"
        outputs.append(proc.stdout)
    if group in CHECKS:
        CHECKS[group](work, outputs)


@pytest.mark.slow
def test_shipped_direction_is_the_documented_derivation():
    """demo/directions/brightness.npy is what demo/make_directions.py derives from the demo generator."""
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "demo", "make_directions.py"), "--check"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "largest difference from" in proc.stdout
