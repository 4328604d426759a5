"""Where the repository and the test data lie, named once so a test's depth in tests/ does not matter."""
from __future__ import annotations

import os

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
DATA_DIR = os.path.join(TESTS_DIR, "data")


def with_test_imports(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository and tests/ first on PYTHONPATH: for a test file or helper run as a script in a
    process of its own, which then imports the project's packages and ``helpers`` as the tests do."""
    paths = [REPO_ROOT, TESTS_DIR, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}
