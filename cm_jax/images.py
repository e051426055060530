"""Image grids and PNG files (host-side numpy)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images_BHWC: np.ndarray, pad: int = 2, pad_value: int = 128, cols: int | None = None) -> np.ndarray:
  """Tiles uint8 images (B, H, W, C) into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row by row;
  cols None: a near-square grid."""
  b, h, w, c = images_BHWC.shape
  cols = math.ceil(math.sqrt(b)) if cols is None else cols
  rows = math.ceil(b / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, img in enumerate(images_BHWC):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
  return grid


def side_by_side(panels: list[np.ndarray], gap: int = 8, pad_value: int = 255) -> np.ndarray:
  """Concatenates grids horizontally with a white gap (heights padded to the tallest)."""
  height = max(p.shape[0] for p in panels)
  parts = []
  for i, p in enumerate(panels):
    if i:
      parts.append(np.full((height, gap, p.shape[2]), pad_value, np.uint8))
    parts.append(np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=pad_value))
  return np.concatenate(parts, axis=1)


def save_png(image_HWC: np.ndarray, path: str) -> str:
  """Writes a uint8 (H, W, 1|3) image as PNG, creating the directory; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC
  Image.fromarray(img).save(path)
  return path
