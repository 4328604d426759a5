"""The quad of NVlabs' ffhq-dataset `recreate_aligned_images`, transcribed line for line: the independent
reference the FFHQ geometry and crops are tested against (one copy for every test that needs it)."""
from __future__ import annotations

import numpy as np


def nvlabs_quad(lm) -> tuple[np.ndarray, float]:
    """(quad as 4x2 float64 corners, the quad's side) for 68 landmarks, in the reference script's operations."""
    lm = np.array(lm, dtype=np.float64)
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]), float(np.hypot(*x) * 2)
