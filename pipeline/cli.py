"""What the command lines share: logging, and the exit code of a job (2 for a refused config or output)."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from .config import ConfigError
from .ledger import RefusedError
from .storage import StorageError

__all__ = ["setup_logging", "cli_exit_code"]


def setup_logging(level: str = "INFO") -> None:
    """CLI logging: our records at `level`, the storage libraries' chatter at WARNING."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cli_exit_code(job: Callable[[], int]) -> int:
    """``job()``'s exit code; an invalid config, a refused output or storage the run cannot start with is
    printed to stderr as one line and exits 2 (the checks run before anything is written)."""
    try:
        return job()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RefusedError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: storage: {e}", file=sys.stderr)
        return 2
