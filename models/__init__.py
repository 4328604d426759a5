"""E2Style and StyleGAN2 models. Knows nothing of Ray or storage."""

from .checkpoint import CheckpointError, load_e2style, load_stylegan2
from .e2style import E2Style, InversionOutput
from .stylegan2 import Generator

__all__ = ["CheckpointError", "E2Style", "Generator", "InversionOutput", "load_e2style", "load_stylegan2"]
