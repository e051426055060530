"""A directory of class subdirectories of JPEG/PNG images of any size (data.name = 'image_folder').

Labels: one class per subdirectory in sorted folder-name order; or, with a class map (a JSON file {folder name:
label}), only the named folders, with those labels (several folders may share a label: superclasses such as
ImageNet-9 from an ImageNet train folder). Each class folder is searched recursively; files without a
.jpg/.jpeg/.png extension and hidden entries (names starting with '.') are ignored, and files are listed in
sorted order. Every image is converted to RGB (grayscale, RGBA, palette), centre-cropped to a square and resized.
There is only a 'train' split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import time
from typing import Any, Optional

from absl import logging
import numpy as np
from PIL import Image

from cm_jax.data import decode_pool
from cm_jax.data import transforms
from cm_jax.data.dataset import DataUnavailableError
from cm_jax.runtime import errors

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
SPLITS = ('train',)
_MAX_THREADS = 16
_LOG_EVERY_S = 5.0


@dataclasses.dataclass(frozen=True)
class Listing:
  """The image files of a folder and their labels (no pixels read)."""
  root: str
  files: tuple[str, ...]  # Paths relative to root, class folders in sorted order, files sorted within each.
  labels: np.ndarray  # int32 (N,).
  num_classes: int
  sha256: str  # Of the (relative path, byte size, label) list and the class map: identifies the data cheaply.

  def path(self, i: int) -> str:
    return os.path.join(self.root, self.files[i])


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"An image folder has only the 'train' split, not {split!r}: evaluate against it with "
                     "--config.evaluation.reference_split=train (the evaluate CLI: --reference_split=train).")


def _root(manual_dir: Optional[str]) -> str:
  fix = ('set --config.data.manual_dir=DIR to a directory of class subdirectories holding JPEG/PNG images '
         '(DIR/<class>/*.jpg)')
  if not manual_dir:
    raise DataUnavailableError(f"data.name = 'image_folder' needs data.manual_dir: {fix}.")
  if not os.path.exists(manual_dir):
    raise DataUnavailableError(f'data.manual_dir = {manual_dir} does not exist: {fix}.')
  if not os.path.isdir(manual_dir):
    raise DataUnavailableError(f'data.manual_dir = {manual_dir} is not a directory: {fix}.')
  return manual_dir


def _subdirectories(root: str) -> list[str]:
  names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  if not names:
    loose = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(root))
    raise ValueError(f'data.manual_dir = {root} has no class subdirectories' +
                     (' (its images lie directly in it)' if loose else '') +
                     f': put the images in one folder per class, e.g. {os.path.join(root, "<class>", "x.jpg")}.')
  return names


def _read_class_map(path: str) -> dict[str, int]:
  if not os.path.isfile(path):
    raise DataUnavailableError(f'data.class_map = {path} is not a file: set it to a JSON file {{folder: label}} '
                               'or leave it unset (one class per folder).')
  try:
    with open(path) as f:
      mapping = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'data.class_map = {path} is not valid JSON ({e}); it must be an object such as '
                     '{"n01440764": 0, "n02102040": 1}.') from e
  bad = (['(not an object)'] if not isinstance(mapping, dict) else
         [f'{k!r}: {v!r}' for k, v in mapping.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0])
  if bad or not mapping:
    raise ValueError(f'data.class_map = {path} must be a non-empty JSON object {{folder name: non-negative integer '
                     f'label}}; bad entries: {", ".join(bad[:10]) or "(empty)"}.')
  return mapping


def class_labels(manual_dir: Optional[str], class_map: Optional[str]) -> dict[str, int]:
  """{class folder: label} of the folders used, reading no image (cheap)."""
  root = _root(manual_dir)
  folders = _subdirectories(root)
  if not class_map:
    return {name: i for i, name in enumerate(folders)}
  mapping = _read_class_map(class_map)
  missing = sorted(set(mapping) - set(folders))
  if missing:
    raise ValueError(f'data.class_map = {class_map} names folders that are not in {root}: {missing[:20]}'
                     f'{" ..." if len(missing) > 20 else ""}; fix the map or data.manual_dir (folders there: '
                     f'{folders[:10]}{" ..." if len(folders) > 10 else ""}).')
  labels = sorted(set(mapping.values()))
  gaps = sorted(set(range(labels[-1] + 1)) - set(labels))
  if gaps:  # Labels index the model's class embedding: a label no folder carries is a class never trained.
    raise ValueError(f'data.class_map = {class_map} leaves label(s) {gaps[:20]}{" ..." if len(gaps) > 20 else ""} '
                     f'without a folder (its labels are {labels[:10]}{" ..." if len(labels) > 10 else ""}); labels '
                     f'must be 0 to {len(labels) - 1} with none missing: renumber the map.')
  return {name: mapping[name] for name in sorted(mapping)}


def num_classes(manual_dir: Optional[str], class_map: Optional[str]) -> int:
  """max label + 1 (the number of folders without a class map)."""
  return max(class_labels(manual_dir, class_map).values()) + 1


def _images_under(directory: str) -> list[str]:
  found = []
  for parent, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.join(parent, f) for f in sorted(files)
                 if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS))
  return found


def list_folder(manual_dir: Optional[str], class_map: Optional[str]) -> Listing:
  """The sorted image files of every class folder used, with their labels."""
  labels_of = class_labels(manual_dir, class_map)
  root = _root(manual_dir)
  files, labels, records, empty = [], [], [], []
  for name, label in labels_of.items():
    found = _images_under(os.path.join(root, name))
    if not found:
      empty.append(name)
    for path in found:
      rel = os.path.relpath(path, root)
      files.append(rel)
      labels.append(label)
      try:
        size = os.path.getsize(path)
      except OSError as e:  # A broken or looping symbolic link, a file that vanished, no permission.
        raise errors.InputFileError(f'data.manual_dir = {root}: cannot read {path} ({e.strerror or e}); remove '
                                    'or fix that file (a broken or looping link?), then run again.') from None
      records.append((rel, size, label))
  if not files:
    raise ValueError(f'No JPEG/PNG images ({"/".join(IMAGE_EXTENSIONS)}) in the class folders of '
                     f'data.manual_dir = {root}.')
  if empty:
    raise ValueError(f'Class folder(s) without JPEG/PNG images in {root}: {empty}; add images, delete the folders'
                     + (', or leave them out of data.class_map.' if class_map else '.'))
  mapping = _read_class_map(class_map) if class_map else None
  digest = hashlib.sha256(json.dumps({'files': records, 'class_map': mapping}, sort_keys=True).encode())
  logging.info('Image folder %s: %d images in %d folders, %d classes.', root, len(files), len(labels_of),
               max(labels_of.values()) + 1)
  return Listing(root, tuple(files), np.asarray(labels, np.int32), max(labels_of.values()) + 1, digest.hexdigest())


def decode(path: str, size: int, draft: bool = False) -> np.ndarray:
  """uint8 (size, size, 3) of an image file; ValueError naming the file if PIL cannot read it.

  draft: let PIL's JPEG decoder scale down by 2, 4 or 8 while decoding (to no less than the side the crop and
  resize need): several times faster on large photographs, but NOT the same pixels as the full decode followed
  by the box-halving resize (benchmarks/reader.py measures the difference; data.jpeg_draft).
  """
  try:
    with Image.open(path) as image:
      if draft and image.format == 'JPEG':
        scale = max(1, min(8, min(image.size) // size))
        scale = 1 << (scale.bit_length() - 1)  # 1, 2, 4 or 8: what the JPEG decoder can do.
        image.draft('RGB', (image.size[0] // scale, image.size[1] // scale))
      rgb = transforms.to_rgb_array(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e}); replace or delete the file.') from e
  return transforms.center_crop_resize(rgb, size)


def _threads() -> int:
  return max(1, min(_MAX_THREADS, os.cpu_count() or 1))


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity, which SLURM and taskset narrow), else os.cpu_count()."""
  if hasattr(os, 'sched_getaffinity'):
    return max(1, len(os.sched_getaffinity(0)))
  return os.cpu_count() or 1


def worker_count(decode_workers: int) -> int:
  """data.decode_workers as a number of processes: 0 (threads in the training process), -1 (one per core this
  process may use: usable_cores), N."""
  if decode_workers < -1:
    raise ValueError(f'data.decode_workers must be -1 (one process per core), 0 (threads) or a number of worker '
                     f'processes, got {decode_workers}.')
  return usable_cores() if decode_workers == -1 else int(decode_workers)


class Decoder:
  """Decodes lists of files, in order: a thread pool in this process (workers = 0) or `workers` processes
  (cm_jax/data/decode_pool.py), started on first use; close() stops them (a later call starts them again)."""

  def __init__(self, size: int, workers: int = 0, draft: bool = False, threads: Optional[int] = None):
    self.size, self.workers, self.draft = size, workers, draft
    self._threads = threads or _threads()
    self._pool: Any = None
    self._lock = threading.Lock()

  def __call__(self, paths: list[str]) -> list[np.ndarray]:
    with self._lock:
      if self._pool is None:
        self._pool = (decode_pool.DecodePool(self.workers, self.size, self.draft) if self.workers else
                      concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix='image_folder'))
      pool = self._pool
    if self.workers:
      return pool.decode(paths)
    return list(pool.map(lambda path: decode(path, self.size, self.draft), paths))

  def close(self) -> None:
    with self._lock:
      pool, self._pool = self._pool, None
    if pool is None:
      return
    if self.workers:
      pool.close()
    else:
      pool.shutdown(wait=True)


def load_arrays(listing: Listing, size: int, with_labels: bool, workers: int = 0,
                draft: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Every image decoded into memory (threads, or `workers` processes; progress logged every few seconds)."""
  n = len(listing.files)
  images = np.zeros((n, size, size, 3), np.uint8)
  t0 = last_log = time.time()
  decoder = Decoder(size, workers, draft)
  chunk = 64 * max(1, workers or _threads())
  try:
    for start in range(0, n, chunk):
      stop = min(n, start + chunk)
      images[start:stop] = decoder([listing.path(k) for k in range(start, stop)])
      if time.time() - last_log > _LOG_EVERY_S:
        logging.info('Decoded %d/%d images of %s (%.0f s, ETA %.0f s).', stop, n, listing.root, time.time() - t0,
                     (time.time() - t0) / stop * (n - stop))
        last_log = time.time()
  finally:
    decoder.close()
  logging.info('Decoded %d images of %s to %dx%d in %.1f s.', n, listing.root, size, size, time.time() - t0)
  return images, (listing.labels.copy() if with_labels else None)


def source_fingerprint(listing: Listing, image_shape: tuple[int, int, int], draft: bool = False) -> dict:
  """What identifies a folder's training rows, whatever the storage: the files (path, size, label), the shape
  and (when on) JPEG draft decoding, which changes the pixels.

  Cheaper than hashing decoded pixels, and independent of the decoder (a Pillow upgrade does not block a resume).
  """
  fingerprint = {'num_examples': len(listing.files), 'shape': list(image_shape), 'source': 'image_folder',
                 'files_sha256': listing.sha256}
  if draft:
    fingerprint['decode'] = 'jpeg_draft'
  return fingerprint


def _header_problem(path: str) -> Optional[str]:
  """Why the image file at `path` cannot be used (its header does not read as an image), or None."""
  try:
    with Image.open(path) as image:
      if min(image.size) < 1:
        return f'empty image {image.size}'
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
  return None


def preflight(listing: Listing, skip_unreadable: bool = False) -> Listing:
  """Reads the header of every file of a streamed folder before training (threads, progress every few seconds),
  so that an unreadable file stops the run at once with its path instead of hours in, when first drawn.

  skip_unreadable: list such files in the log and leave them out instead (the listing, and so the data
  fingerprint and the batches, then describe the files kept).
  """
  n = len(listing.files)
  t0 = last_log = time.time()
  bad = []
  with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
    for i, problem in enumerate(pool.map(lambda k: _header_problem(listing.path(k)), range(n))):
      if problem is not None:
        bad.append((i, problem))
      if time.time() - last_log > _LOG_EVERY_S:
        logging.info('Checked the headers of %d/%d images of %s (%.0f s, ETA %.0f s).', i + 1, n, listing.root,
                     time.time() - t0, (time.time() - t0) / (i + 1) * (n - i - 1))
        last_log = time.time()
  logging.info('Checked the headers of %d images of %s in %.1f s: %d unreadable.', n, listing.root,
               time.time() - t0, len(bad))
  if not bad:
    return listing
  names = '; '.join(f'{listing.path(i)} ({problem})' for i, problem in bad[:5]) + (' ...' if len(bad) > 5 else '')
  if not skip_unreadable:
    raise ValueError(f'data.manual_dir = {listing.root}: {len(bad)} of {n} image files are unreadable: {names}. '
                     'Replace or delete them, or set --config.data.skip_unreadable=True to leave them out.')
  for i, problem in bad:
    logging.warning('Leaving out the unreadable image %s (%s); data.skip_unreadable = True.', listing.path(i),
                    problem)
  keep = np.setdiff1d(np.arange(n), [i for i, _ in bad])
  if not len(keep):
    raise ValueError(f'data.manual_dir = {listing.root}: none of its {n} image files is readable: {names}.')
  digest = hashlib.sha256((listing.sha256 + json.dumps([listing.files[i] for i, _ in bad])).encode()).hexdigest()
  return dataclasses.replace(listing, files=tuple(listing.files[i] for i in keep), labels=listing.labels[keep],
                             sha256=digest)


class FolderStreamDataset:
  """The images of a folder decoded on demand, row by row (data.storage = 'stream'): in threads, or in
  `workers` processes (data.decode_workers)."""

  def __init__(self, listing: Listing, size: int, with_labels: bool, threads: Optional[int] = None,
               workers: int = 0, draft: bool = False):
    self._listing, self._with_labels = listing, with_labels
    self._decoder = Decoder(size, workers, draft, threads)
    self.num_examples = len(listing.files)
    self.image_shape = (size, size, 3)
    self.num_classes = listing.num_classes
    self.fingerprint = source_fingerprint(listing, self.image_shape, draft)

  def get(self, indices: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    decoded = self._decoder([self._listing.path(int(k)) for k in idx])
    images = np.stack(decoded) if decoded else np.zeros((0,) + self.image_shape, np.uint8)
    return images, (self._listing.labels[idx] if self._with_labels else None)

  def close(self) -> None:
    """Stops the decoding threads or processes (a later get starts them again)."""
    self._decoder.close()
