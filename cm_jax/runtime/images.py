"""Image grids and PNG files (host-side numpy)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from cm_jax.runtime import paths


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
  """Writes a uint8 (H, W, 1|3) image as PNG (a local path or a URI such as gs://...), creating the directory;
  returns the path."""
  img = image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC
  encoded = io.BytesIO()
  Image.fromarray(img).save(encoded, format='PNG')  # Encoded first: a failure writes no file.
  paths.write_file(path, lambda f: f.write(encoded.getvalue()))
  return path
