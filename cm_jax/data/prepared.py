"""An image folder decoded once into a memory-mapped uint8 array (data.storage = 'prepared').

Streaming decodes every JPEG again each epoch; a prepared folder is decoded and resized once
(`python -m cm_jax.prepare`), after which training reads rows at memory speed (ImageNet at 64x64 is ~16 GB, which
the page cache holds). A prepared directory:

  meta.json        format, the folder's fingerprint (the same as streaming's: a run may switch between
                   'stream', 'memory' and 'prepared' and still resume), image shape, classes, chunk size
  images.u8        uint8 (N, size, size, 3), row i = image_folder.decode(file i), C order, no header
  labels.npy       int32 (N,)
  chunks/NNNNNN    the SHA-256 of the bytes of chunk NNNNNN (rows [k*chunk, (k+1)*chunk)), written once the
                   rows are on disk: what is done, for a resumed preparation, and what is verified when opened
  COMPLETE         written when every chunk is done

Preparation is resumable (an interrupted run redoes only the chunks without a record) and can be shared by
several processes or machines over one file system (--part=I/N takes the chunks k with k % N == I). Opening a
prepared directory checks that it is complete, the sizes, and every chunk's SHA-256 (threads; a few seconds per
10 GB), so a damaged file stops the run with its name instead of training on it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import numpy as np

from cm_jax.data import image_folder
from cm_jax.runtime import errors
from cm_jax.runtime import paths

FORMAT = 'cm_jax.prepared_folder/1'
CHUNK = 2048  # Images per chunk: the unit of resumption, sharing and verification.
_LOG_EVERY_S = 5.0


def default_chunk(size: int) -> int:
  """Images per chunk for size x size RGB rows: CHUNK, fewer for large images (chunks of at most ~64 MB)."""
  return int(max(16, min(CHUNK, (64 << 20) // (size * size * 3))))


class PreparedDataError(errors.InputFileError):
  """A prepared directory that is missing, unfinished, damaged or holds other data."""


def _meta_path(out: str) -> str:
  return os.path.join(out, 'meta.json')


def _chunk_path(out: str, k: int) -> str:
  return os.path.join(out, 'chunks', f'{k:06d}')


def _num_chunks(n: int, chunk: int) -> int:
  return (n + chunk - 1) // chunk


def _check_local(out: str, what: str) -> None:
  if paths.is_remote(out):
    raise errors.UsageError(f'{what} = {out}: a prepared folder is memory-mapped, so it must be on a local (or '
                            'mounted) file system; copy it to local disk first.')


def _write_json(path: str, record: dict) -> None:
  paths.write_file(path, lambda f: f.write((json.dumps(record, indent=1, sort_keys=True) + '\n').encode()))


def _read_json(path: str, fix: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise PreparedDataError(f'{path} is missing; {fix}') from None
  except (OSError, ValueError) as e:
    raise PreparedDataError(f'{path}: unreadable ({type(e).__name__}: {e}); {fix}') from None


def _chunks_done(out: str, num_chunks: int) -> list[int]:
  return [k for k in range(num_chunks) if os.path.exists(_chunk_path(out, k))]


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  out: str
  num_examples: int
  chunks: int
  chunks_done: int  # By any process, this one and earlier runs included.
  decoded_here: int  # Images this call decoded.
  complete: bool


def prepare(listing: image_folder.Listing, size: int, out: str, workers: int = 0, draft: bool = False,
            part: tuple[int, int] = (0, 1), chunk: int = CHUNK,
            clock: Callable[[], float] = time.time) -> PrepareResult:
  """Decodes the chunks of `listing` that belong to `part` and are not yet done into OUT/images.u8.

  part = (I, N): the chunks k with k % N == I (several processes or machines sharing one file system each take
  one part; the last to finish marks the directory complete). Resumable: a chunk is recorded only once its
  rows are written and flushed to disk. Raises PreparedDataError if OUT holds a preparation of other data.
  """
  _check_local(out, '--out')
  index, count = part
  if not (count >= 1 and 0 <= index < count):
    raise errors.UsageError(f'--part={index}/{count}: give I/N with 0 <= I < N, e.g. 0/1.')
  n = len(listing.files)
  shape = (size, size, 3)
  row_bytes = int(np.prod(shape))
  meta = {'format': FORMAT, 'fingerprint': image_folder.source_fingerprint(listing, shape, draft),
          'num_examples': n, 'image_shape': list(shape), 'num_classes': int(listing.num_classes), 'chunk': chunk,
          'source_root': listing.root}
  if os.path.exists(_meta_path(out)):
    old = _read_json(_meta_path(out), f'delete {out} to start the preparation over.')
    keys = ('format', 'fingerprint', 'num_examples', 'image_shape', 'num_classes', 'chunk')
    differ = [key for key in keys if old.get(key) != meta[key]]
    if differ:
      what = ', '.join(f'{k}: {old.get(k)} there, {meta[k]} now' for k in differ)
      raise PreparedDataError(f'--out={out} holds a preparation of other data ({what}); give another directory, '
                              'or delete it to start over.')
  elif os.path.isdir(out) and os.listdir(out):
    raise errors.UsageError(f'--out={out} exists and is not a cm_jax prepared folder (no meta.json); give a new or '
                            'empty directory.')
  os.makedirs(os.path.join(out, 'chunks'), exist_ok=True)
  if not os.path.exists(_meta_path(out)):  # First: meta.json marks the directory as a preparation of this data.
    _write_json(_meta_path(out), meta)
  if not os.path.exists(os.path.join(out, 'labels.npy')):
    paths.write_file(os.path.join(out, 'labels.npy'), lambda f: np.save(f, listing.labels.astype(np.int32)))
  images_path = os.path.join(out, 'images.u8')
  fd = os.open(images_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if os.fstat(fd).st_size not in (0, n * row_bytes):
      raise PreparedDataError(f'{images_path} has {os.fstat(fd).st_size} bytes, not {n * row_bytes}; delete {out} '
                              'to start over.')
    os.ftruncate(fd, n * row_bytes)  # Sparse until written.
    num_chunks = _num_chunks(n, chunk)
    todo = [k for k in range(index, num_chunks, count) if not os.path.exists(_chunk_path(out, k))]
    total = sum(min(n, (k + 1) * chunk) - k * chunk for k in todo)
    logging.info('Preparing %s: %d images of %s in %d chunks; part %d/%d: %d chunks (%d images) to decode.', out, n,
                 listing.root, num_chunks, index, count, len(todo), total)
    decoder = image_folder.Decoder(size, workers, draft)
    t0 = last_log = clock()
    decoded = 0
    try:
      for k in todo:
        lo, hi = k * chunk, min(n, (k + 1) * chunk)
        rows = np.stack(decoder([listing.path(i) for i in range(lo, hi)]))
        data = rows.tobytes()
        written = os.pwrite(fd, data, lo * row_bytes)
        if written != len(data):
          raise OSError(f'short write to {images_path}')
        os.fsync(fd)
        paths.write_file(_chunk_path(out, k), lambda f, d=data: f.write(hashlib.sha256(d).hexdigest().encode()))
        decoded += hi - lo
        if clock() - last_log > _LOG_EVERY_S:
          rate = decoded / max(clock() - t0, 1e-9)
          logging.info('Prepared %d/%d images of this part (%.0f images/s, ETA %.0f s).', decoded, total, rate,
                       (total - decoded) / rate)
          last_log = clock()
    finally:
      decoder.close()
  except OSError as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.OutputPathError(f'--out={out}: {e.strerror or e}; the chunks written so far are kept, and a rerun '
                                 'continues from them.') from e
  finally:
    os.close(fd)
  done = _chunks_done(out, num_chunks)
  complete = len(done) == num_chunks
  if complete and not os.path.exists(os.path.join(out, 'COMPLETE')):
    _write_json(os.path.join(out, 'COMPLETE'), {'chunks': num_chunks, 'num_examples': n})
  logging.info('Prepared %s: %d/%d chunks done%s (%d images decoded here in %.0f s).', out, len(done), num_chunks,
               '' if complete else ' (other parts still to run)', decoded, clock() - t0)
  return PrepareResult(out, n, num_chunks, len(done), decoded, complete)


def read_meta(out: str) -> dict:
  """meta.json of a prepared directory (PreparedDataError naming the fix if it is not one)."""
  _check_local(out, 'data.prepared_dir')
  if not os.path.isdir(out):
    raise PreparedDataError(f'data.prepared_dir = {out} is not a directory; make it with `python -m cm_jax.prepare '
                            '--config=... --out=DIR` first.')
  meta = _read_json(_meta_path(out), 'make the directory with `python -m cm_jax.prepare --config=... --out=DIR`.')
  if meta.get('format') != FORMAT:
    raise PreparedDataError(f'{_meta_path(out)}: format {meta.get("format")!r}, expected {FORMAT!r}; prepare the '
                            'folder again with this version of cm_jax.')
  return meta


def _verify(out: str, images: np.ndarray, meta: dict) -> None:
  chunk, n = int(meta['chunk']), int(meta['num_examples'])
  num_chunks = _num_chunks(n, chunk)

  def check(k: int) -> Optional[int]:
    try:
      with open(_chunk_path(out, k)) as f:
        expected = f.read().strip()
    except OSError:
      return k
    rows = np.ascontiguousarray(images[k * chunk:min(n, (k + 1) * chunk)])
    return None if hashlib.sha256(rows.data).hexdigest() == expected else k

  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    bad = [k for k in pool.map(check, range(num_chunks)) if k is not None]
  if bad:
    raise PreparedDataError(
        f'{os.path.join(out, "images.u8")}: chunk(s) {bad[:10]}{" ..." if len(bad) > 10 else ""} of {num_chunks} '
        f'do not match their SHA-256 (rows k*{chunk}...); delete {out}/chunks/ entries of those chunks and rerun '
        '`python -m cm_jax.prepare` with the same flags to decode them again.')
  logging.info('Verified the %d chunks of %s in %.1f s.', num_chunks, out, time.time() - t0)


class PreparedDataset:
  """The rows of a prepared directory, memory-mapped (read-only); verified when opened."""

  def __init__(self, out: str, size: int, with_labels: bool, verify: bool = True):
    meta = read_meta(out)
    fix = f'rerun `python -m cm_jax.prepare` with the same flags to finish {out}.'
    n, shape = int(meta['num_examples']), tuple(int(d) for d in meta['image_shape'])
    if not os.path.exists(os.path.join(out, 'COMPLETE')):
      num_chunks = _num_chunks(n, int(meta['chunk']))
      done = len(_chunks_done(out, num_chunks))
      raise PreparedDataError(f'data.prepared_dir = {out} is unfinished ({done} of {num_chunks} chunks); {fix}')
    if shape != (size, size, 3):
      raise errors.ConfigError(f'config.data.image_size: {size} does not match the prepared images of {out} '
                               f'({shape[0]}x{shape[1]}); set --config.data.image_size={shape[0]} or prepare the '
                               'folder again at this size.')
    images_path = os.path.join(out, 'images.u8')
    expected = n * int(np.prod(shape))
    actual = os.path.getsize(images_path) if os.path.exists(images_path) else None
    if actual != expected:
      raise PreparedDataError(f'{images_path}: {actual} bytes, expected {expected}; {fix}')
    self._images = np.memmap(images_path, np.uint8, 'r', shape=(n,) + shape)
    try:
      labels = np.load(os.path.join(out, 'labels.npy'), allow_pickle=False)
    except (OSError, ValueError) as e:
      raise PreparedDataError(f'{os.path.join(out, "labels.npy")}: unreadable ({e}); {fix}') from None
    if labels.shape != (n,):
      raise PreparedDataError(f'{os.path.join(out, "labels.npy")}: shape {labels.shape}, expected ({n},); {fix}')
    if verify:
      _verify(out, self._images, meta)
    self._labels = labels.astype(np.int32) if with_labels else None
    self.num_examples = n
    self.image_shape = shape
    self.num_classes = int(meta['num_classes'])
    self.fingerprint = dict(meta['fingerprint'])

  def get(self, indices: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    idx = np.asarray(indices, np.int64).reshape(-1)
    return np.asarray(self._images[idx]), None if self._labels is None else self._labels[idx]
