"""The two-step search: the intermediate time of two-step consistency sampling that minimises a Frechet distance.

A ternary search over the interior of a Karras grid, as the official CM code (CIFAR-10 CD picks index 11 of 18,
sigma = 0.585); each candidate samples and scores a full set, with the same noise at every candidate.
"""

from __future__ import annotations

import functools
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from cm_jax import samplers
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import karras
from cm_jax.runtime import progress as progress_lib


def ternary_search(metric_at: Callable[[int], float], lo: int, hi: int) -> int:
  """Integer argmin of a unimodal metric on [lo, hi]: thirds until < 4 candidates remain, then all of them.

  metric_at is called once per index at most if it memoises (see `search_two_step_time`).
  """
  if lo > hi:
    raise ValueError(f'Empty search range [{lo}, {hi}].')
  while hi - lo >= 3:
    m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
    if metric_at(m1) < metric_at(m2):
      hi = m2 - 1  # The minimum of a unimodal function is left of m2.
    else:
      lo = m1 + 1
  return min(range(lo, hi + 1), key=metric_at)


def max_ternary_evaluations(lo: int, hi: int) -> int:
  """The most distinct indices `ternary_search` evaluates on [lo, hi], over every outcome of its comparisons
  (the count depends on them: 6 to 8 on [1, 16]); the two-step search's progress counts towards it."""
  @functools.lru_cache(maxsize=None)
  def most_new(size: int, seen: frozenset) -> int:  # On [0, size - 1], `seen` evaluated already (memoised).
    if size < 4:
      return size - len(seen)
    m1, m2 = (size - 1) // 3, size - 1 - (size - 1) // 3
    new = len({m1, m2} - seen)
    seen = seen | {m1, m2}
    left = frozenset(i for i in seen if i <= m2 - 1)
    right = frozenset(i - m1 - 1 for i in seen if i >= m1 + 1)
    return new + max(most_new(m2, left), most_new(size - m1 - 1, right))
  return most_new(hi - lo + 1, frozenset()) if lo <= hi else 0


def search_two_step_time(score_at_time: Callable[[float], dict], fd_key: str,
                         config: ml_collections.ConfigDict, points: int) -> dict:
  """Ternary search of two-step sampling's intermediate time over the interior of a `points` Karras grid
  (the points below sampling.start_t when that is set)."""
  cc = config.consistency
  if points < 3:
    raise ValueError(f'--search_points must be >= 3 (a grid with an interior), got {points}.')
  flow = denoiser_lib.is_flow_model(config)
  if flow:  # MeanFlow: flow times, equally spaced from 1 (noise) to 0 (data).
    grid, first = np.linspace(1.0, 0.0, points), 1.0
  else:
    grid = np.asarray(karras.karras_grid(points, cc.sigma_min, cc.sigma_max, cc.rho), np.float64)[::-1]  # Descending.
    first = samplers.start_time(config)  # Consistency sampling's first time, checked to lie in (eps, T].
  lo = next((i for i in range(1, points - 1) if grid[i] < first), None)
  if lo is None:
    raise ValueError(f'No point of the {points}-point grid lies below sampling.start_t = {first:g}; raise '
                     '--search_points.')
  evaluated: dict[int, dict] = {}
  # Each candidate samples and scores a full set (minutes): progress counts them towards the most the search
  # can need, an upper bound, as is the ETA (the search may stop sooner).
  progress = progress_lib.Progress('Two-step search', total=max_ternary_evaluations(lo, points - 2),
                                   unit='candidates', total_is_upper_bound=True, enabled=jax.process_index() == 0)

  def metric_at(index: int) -> float:
    if index not in evaluated:
      t = float(grid[index])
      evaluated[index] = dict(index=index, t=t, **score_at_time(t))
      logging.info('Two-step search: grid index %d (t = %.4f): %s = %.4f', index, t, fd_key,
                   evaluated[index][fd_key])
      progress.update(1)
    return evaluated[index][fd_key]

  best = ternary_search(metric_at, lo, points - 2)
  progress.done()
  description = ('flow times, equally spaced, descending (index 0 = 1, noise)' if flow else
                 'Karras, descending (index 0 = sigma_max)')
  return {'grid_points': points, 'grid': description, 'metric': fd_key,
          'best_index': best, 'best_t': evaluated[best]['t'], 'best': evaluated[best],
          'evaluated': [evaluated[i] for i in sorted(evaluated)]}
