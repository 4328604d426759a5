"""Where dlib's model files are: the one lookup the detectors use (an argument, the environment, or the
``face-recognition-models`` package found without importing it)."""
from __future__ import annotations

import importlib.util
import os

__all__ = ["LANDMARK_MODEL_ENV", "LANDMARK_MODEL_NAME", "find_landmark_model"]

LANDMARK_MODEL_ENV = "E2STYLE_LANDMARK_MODEL"
LANDMARK_MODEL_NAME = "shape_predictor_68_face_landmarks.dat"


def find_landmark_model(path: str | None = None) -> str:
    """Path of dlib's 68-point shape predictor.

    Order: ``path`` argument, environment variable ``E2STYLE_LANDMARK_MODEL``, then the
    ``face-recognition-models`` package, located without importing it (its __init__ needs pkg_resources,
    which setuptools >= 82 no longer ships).
    """
    candidates = []
    if path:
        candidates.append(path)
    elif os.environ.get(LANDMARK_MODEL_ENV):
        candidates.append(os.environ[LANDMARK_MODEL_ENV])
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is not None and spec.submodule_search_locations:
            candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "models", LANDMARK_MODEL_NAME))
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"{LANDMARK_MODEL_NAME} not found (tried {candidates or 'nothing'}); install face-recognition-models "
        f"or set {LANDMARK_MODEL_ENV}"
    )
