"""One loop for batched work on every device: pad, shard, run, gather, cut, report progress.

    out = device_map.map_batches(fn, [images_NHWC], num=len(images_NHWC), batch_size=256, mesh=mesh,
                                 progress_label='Editing (inpaint)')

Sampling, editing, the feature classifier and the Inception features all run this loop. Every process runs it
with the same full inputs on its host; with a mesh each batch is split over the mesh's devices (device k
computes rows [k B/n, (k + 1) B/n)) and every process gets all of fn's rows back (a collective in a
multi-process run: every process must call it together).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
from jax.sharding import Mesh
import numpy as np

from cm_jax.runtime import progress as progress_lib
from cm_jax.runtime import sharding


def batch_size_for(batch_size: int, num: int, mesh: Optional[Mesh]) -> int:
  """The one batch size of `map_batches`: min(batch_size, num), rounded up to a multiple of the mesh's devices."""
  size = max(1, min(batch_size, num))
  return size if mesh is None else sharding.padded_batch_size(size, mesh)


def map_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray], num: int, batch_size: int,
                mesh: Optional[Mesh] = None, *, pad_last: bool = True, progress_label: Optional[str] = None,
                unit: str = 'images', before_batch: Optional[Callable[[], None]] = None) -> Any:
  """fn(start, *batch) over rows [start, start + B) of `arrays` (each with at least `num` rows, axis 0), for
  start = 0, B, 2B, ... < num, with B = batch_size_for(batch_size, num, mesh); returns fn's outputs (an array
  or a tuple/pytree of arrays, one row per input row) as numpy, rows [0, num), batches concatenated.

  The last batch is padded to B rows by repeating its last row (pad_last; rows past num are dropped), so fn
  compiles for one shape; pad_last=False hands it the short batch instead (a host function such as TensorFlow's
  Inception). With a mesh the batch arrays reach fn split over its devices (sharding.shard_batch) and fn's
  outputs come back whole to every process (sharding.to_host). `arrays` may be empty: fn(start) then makes its
  rows from `start` alone (sampling draws example i's noise from key i). before_batch() runs before each batch
  (training passes its preemption check, which may raise). With a progress_label, process 0 logs progress lines
  (rate, ETA; cm_jax.runtime.progress) as rows come back.
  """
  size = batch_size_for(batch_size, num, mesh)
  progress = progress_lib.Progress(progress_label or '', total=num, unit=unit,
                                   enabled=progress_label is not None and jax.process_index() == 0)
  parts = []
  for start in range(0, num, size):
    if before_batch is not None:
      before_batch()
    batch = [a[start:start + size] for a in arrays]
    if pad_last:
      batch = [sharding.pad_rows(b, size) for b in batch]
    if mesh is not None:
      batch = [sharding.shard_batch(b, mesh) for b in batch]
    rows = min(size, num - start)
    parts.append(jax.tree.map(lambda y, rows=rows: sharding.to_host(y)[:rows], fn(start, *batch)))
    progress.update(rows)  # After to_host: the batch is done, and counting it costs nothing.
  progress.done()
  if not parts:
    raise ValueError('map_batches needs num >= 1.')
  return jax.tree.map(lambda *ys: np.concatenate(ys), *parts)
