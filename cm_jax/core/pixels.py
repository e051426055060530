"""Pixel scaling between stored uint8 images and the model's [-1, 1] range (numpy only).

A light module so the train step needs no data readers; cm_jax.input_pipeline re-exports both functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_model_range(x_uint8: Any) -> Any:
  """uint8 [0, 255] -> float32 [-1, 1]; works on numpy and jax arrays."""
  if not hasattr(x_uint8, 'astype'):
    x_uint8 = np.asarray(x_uint8)
  return x_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x: Any) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] with rounding and clipping (numpy)."""
  x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
