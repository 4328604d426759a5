"""Running a file of Triton kernel checks under Triton's interpreter, in a process of its own (TRITON_INTERPRET
must be set before triton is imported), and asserting that every check of it passed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from helpers.paths import REPO_ROOT, with_test_imports

TRITON_MISSING = ("triton is not installed; it is a test dependency (`make install`, or pip install triton==3.5.1 "
                  "beside a CPU torch): these tests run the GPU kernels under its interpreter")


def run_checks_interpreted(script: str, args: list[str], expected: list[str], timeout: float = 900) -> str:
    """Runs ``script`` with ``args`` under the interpreter; it prints ``PASS <name>`` per check passed. Fails the
    calling test unless it exits 0 having passed exactly ``expected``, in order (none lost to an early exit).
    Returns its output."""
    if importlib.util.find_spec("triton") is None:
        raise AssertionError(TRITON_MISSING)
    env = with_test_imports({**os.environ, "TRITON_INTERPRET": "1"})
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)
    report = f"{os.path.basename(script)} {' '.join(args)}: exit status {proc.returncode}\n{proc.stdout}\n" \
             f"{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PASS ")]
    assert passed == expected, report
    return proc.stdout
