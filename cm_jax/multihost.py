"""Multi-process helpers: every process (one per host, or per GPU) runs the same code."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax

T = TypeVar('T')


def process_zero_first(fn: Callable[[], T], barrier_name: str) -> T:
  """fn() on process 0, a barrier, then fn() on the other processes.

  For work that fills a cache or downloads data on a shared filesystem: the others then read what process 0
  wrote instead of racing it (without a shared filesystem they repeat the work themselves).
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(barrier_name)
  return result if jax.process_index() == 0 else fn()
