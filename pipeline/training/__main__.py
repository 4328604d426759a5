"""``python -m pipeline.training --config configs/train_synthetic.yaml``: the same as ``run_pipeline.py train``."""
import sys

from .cli import main

sys.exit(main())
