"""Image geometry shared by every RGB source: centre crop to a square, then resize to size x size."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_square(image_HWC: np.ndarray) -> np.ndarray:
  """The central square of side min(H, W) (the extra row/column, if odd, is dropped at the bottom/right)."""
  h, w = image_HWC.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image_HWC[top:top + side, left:left + side]


def resize_square(image: Image.Image, size: int) -> Image.Image:
  """A square PIL image resized to size x size: halved with box (area) filters while it stays >= 2 size, then
  bicubic for the rest (as the ADM data loader does); bicubic when enlarging."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), Image.Resampling.BOX)
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  return image


def center_crop_resize(image_HWC: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, 3) of any size -> uint8 (size, size, 3): centre crop to a square, then resize_square.

  A no-op (the same array) when the image already is size x size.
  """
  if size < 1:
    raise ValueError(f'The target image size must be >= 1, got {size}.')
  image_HWC = np.asarray(image_HWC)
  if image_HWC.ndim != 3 or image_HWC.shape[-1] != 3 or image_HWC.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 RGB image (H, W, 3), got {image_HWC.dtype} {image_HWC.shape}.')
  if image_HWC.shape[:2] == (size, size):
    return image_HWC
  square = Image.fromarray(np.ascontiguousarray(center_crop_square(image_HWC)))
  return np.asarray(resize_square(square, size), np.uint8)


WIDE_GRAY_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')  # 16-bit grayscale PNGs open in one of these.


def wide_gray_to_uint8(image: Image.Image) -> np.ndarray:
  """uint8 (H, W) of a 16-bit grayscale PIL image (mode in WIDE_GRAY_MODES), 0..65535 scaled to 0..255. PIL's
  own convert('L') / convert('RGB') clips such values at 255, which turns almost every pixel white."""
  wide = np.asarray(image).astype(np.int64)
  return ((wide.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def stored_array(image: Image.Image) -> np.ndarray:
  """uint8 (H, W, C) of any PIL image with the channels it stores: C = 1 (grayscale, 16-bit scaled), 2
  (grayscale + alpha), 3 (RGB) or 4 (RGBA; also palette images with transparency); other modes as RGB."""
  if image.mode in WIDE_GRAY_MODES:
    return wide_gray_to_uint8(image)[..., None]
  if image.mode not in ('L', 'LA', 'RGB', 'RGBA'):
    # PIL asks palette images with transparency to go through RGBA.
    image = image.convert('RGBA' if image.mode == 'P' and 'transparency' in image.info else 'RGB')
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def to_rgb_array(image: Image.Image) -> np.ndarray:
  """Any PIL image (grayscale of 8 or 16 bits, RGBA, palette, ...) as uint8 RGB (H, W, 3): gray replicated,
  alpha dropped (what PIL's convert('RGB') gives, except that 16-bit gray is scaled instead of clipped)."""
  array = stored_array(image)
  if array.shape[-1] in (1, 2):
    return np.repeat(array[..., :1], 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])
