"""The installed ``e2style`` command: declared in pyproject.toml, resolved by the installed package's metadata
to run_pipeline.main, and working from any folder (the venv is installed editable: `pip install -e .`,
which `make install` runs). Our top-level package names shadowed by a user's own are named, not imported."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import run_pipeline
from helpers.paths import REPO_ROOT

SCRIPT = os.path.join(os.path.dirname(sys.executable), "e2style")
REINSTALL = f"{sys.executable} -m pip install -q --no-deps --no-build-isolation -e {REPO_ROOT}"


def test_pyproject_declares_the_console_script():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"] == {"e2style": "run_pipeline:main"}
    assert "run_pipeline" in project["tool"]["setuptools"]["py-modules"]


def test_entry_point_resolves_to_run_pipeline_main(tmp_path):
    """As an installed package's metadata says, from a folder other than the checkout (whose own build leftovers,
    an ignored *.egg-info, would otherwise be read first)."""
    probe = ("import importlib.metadata, run_pipeline\n"
             "eps = importlib.metadata.entry_points(group='console_scripts', name='e2style')\n"
             "print(len(eps), [e.value for e in eps], all(e.load() is run_pipeline.main for e in eps))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "['run_pipeline:main']", "True"], f"{proc.stdout} (not installed? {REINSTALL})"


def _script(*args: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    assert os.path.isfile(SCRIPT), f"{SCRIPT} missing: {REINSTALL}"
    return subprocess.run([SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_installed_script_help_from_another_folder_with_a_clashing_package(tmp_path):
    """Run from a folder that holds a ``pipeline`` package of its own (a user's project): the command still runs
    ours, and its help lists the subcommands; `edit --help` too."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("raise ImportError('the user\\'s own pipeline package')\n")
    proc = _script("--help", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: e2style ")
    for name in ("train", "decode", "edit", "mix", "interpolate"):
        assert f"\n  {name} " in proc.stdout
    proc = _script("edit", "--help", cwd=str(tmp_path))
    assert proc.returncode == 0 and "--direction NAME=PATH" in proc.stdout, proc.stderr


def test_a_shadowing_package_on_the_path_is_named_exit_2(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    proc = _script("--help", cwd=str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"error: the package 'models' resolves to {tmp_path / 'models'}, not this project's "
        f"{os.path.join(REPO_ROOT, 'models')}: a folder or module of that name on PYTHONPATH or in the working folder "
        f"shadows it; run the e2style command (it does not look in the working folder) or rename yours")
