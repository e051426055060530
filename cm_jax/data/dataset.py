"""The one Dataset interface of cm_jax: rows by index, in host memory or read on demand."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from cm_jax.runtime import errors


class DataUnavailableError(errors.UserError, RuntimeError):
  """No configured or fallback source could provide the dataset."""


class Dataset(Protocol):
  """A split of images (and labels) addressed by row index.

  num_examples: rows of the split. image_shape: (H, W, C) of every row. num_classes: label range.
  fingerprint: JSON-able record of what the rows are (stored in checkpoints; a resumed run must match it).
  get(indices) -> (images uint8 (n, H, W, C), labels int32 (n,) or None when loaded without labels).
  """
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int

  @property
  def fingerprint(self) -> dict:
    ...

  def get(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    ...


def array_fingerprint(images: np.ndarray) -> dict:
  """What the data stream depends on besides (seed, step, batch size): the examples and their order."""
  return {'num_examples': int(len(images)), 'shape': list(images.shape[1:]),
          'sha256': hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}


@dataclasses.dataclass(eq=False)
class ArrayDataset:
  """A whole split held in host memory (data.storage = 'memory'); its fingerprint hashes the image array unless
  the loader gives one (TFDS and folder data record their source instead)."""
  images: np.ndarray  # uint8 (N, H, W, C).
  labels: Optional[np.ndarray]  # int32 (N,), or None when loaded without labels.
  num_classes: int
  _fingerprint: Optional[dict] = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f'Expected uint8 images (N, H, W, C), got {self.images.dtype} {self.images.shape}.')
    if self.labels is not None and self.labels.shape != (len(self.images),):
      raise ValueError(f'Expected {len(self.images)} labels, got shape {self.labels.shape}.')

  @property
  def num_examples(self) -> int:
    return int(len(self.images))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(d) for d in self.images.shape[1:])

  @property
  def fingerprint(self) -> dict:
    if self._fingerprint is None:  # Hashing a big split takes seconds: once.
      self._fingerprint = array_fingerprint(self.images)
    return self._fingerprint

  def get(self, indices: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    idx = np.asarray(indices, np.int64)
    return self.images[idx], None if self.labels is None else self.labels[idx]
