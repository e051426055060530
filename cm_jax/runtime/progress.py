"""Progress lines with rate and ETA for long host-driven loops (sampling, feature extraction, editing, ...).

    progress = progress_lib.Progress('Sampling', total=num, unit='images', enabled=jax.process_index() == 0)
    for ...:
      ...  # The batch's results are on the host here.
      progress.update(len(batch))
    progress.done()

logs, at most every `interval` seconds,
    Sampling: 2,560/10,000 images (25.6%), 312 images/s, ETA 24 s
and at the end one summary line (the only line of a job shorter than `interval`):
    Sampling: 10,000 images in 31.9 s (313 images/s)

The first update of a jitted loop includes compilation, often longer than the whole rest of the loop, so once
there are two updates the rate is measured from the end of the first one: the ETA then reflects the steady
state. Callers update only once a batch's results are on the host (a loop that copies its results there
anyway), so counting costs no device synchronisation and the rate is that of finished work, not of
dispatched work. Pure Python (no jax import): the caller says whether this process logs (`enabled`), since
every process of a multi-process run runs the same loop and process 0 speaks for the run.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from absl import logging

DEFAULT_INTERVAL_S = 10.0


def _log_info(message: str) -> None:
  logging.info('%s', message)


def format_count(n: float) -> str:
  """12345 -> '12,345' (thousands separators: a count of images is read at a glance)."""
  return f'{int(n):,}'


def format_rate(per_second: float) -> str:
  """Three significant figures without scientific notation: '1,234', '312', '31.2', '3.12', '0.312'."""
  if per_second >= 100:
    return f'{per_second:,.0f}'
  if per_second >= 10:
    return f'{per_second:.1f}'
  if per_second >= 1:
    return f'{per_second:.2f}'
  return f'{per_second:.3g}'


def format_duration(seconds: float) -> str:
  """'45 s', '3 min 20 s', '1 h 05 min': a time to wait needs no more precision than that."""
  s = max(0, int(round(seconds)))
  if s < 60:
    return f'{s} s'
  if s < 3600:
    return f'{s // 60} min {s % 60:02d} s'
  minutes = int(round(seconds / 60))
  return f'{minutes // 60} h {minutes % 60:02d} min'


def format_elapsed(seconds: float) -> str:
  """A measured time: tenths of a second below a minute ('31.9 s', where whole seconds would lose the rate's
  basis for short jobs), `format_duration` above."""
  return f'{seconds:.1f} s' if seconds < 59.95 else format_duration(seconds)


class Progress:
  """Counts finished work of a loop and logs progress lines (see the module docstring).

  label: what is done, e.g. 'Sampling' or 'Reference features'. total: the count at the end (None if unknown:
  no percentage or ETA), or the most it can be with total_is_upper_bound (then lines say '3 of at most 8' and
  'ETA at most ...', without a percentage: a search that may stop early). unit: what is counted, plural
  ('images', 'steps'). interval: least seconds between progress lines; the first comes at the first update
  `interval` seconds after the start. enabled: False logs nothing (processes other than 0). log_fn: takes
  each line (default absl logging.info). clock: seconds, monotonic (injectable, so tests are exact).
  """

  def __init__(self, label: str, total: Optional[int] = None, unit: str = 'items', *,
               total_is_upper_bound: bool = False, interval: float = DEFAULT_INTERVAL_S, enabled: bool = True,
               log_fn: Optional[Callable[[str], None]] = None, clock: Callable[[], float] = time.monotonic):
    self.label, self.total, self.unit, self.interval, self.enabled = label, total, unit, float(interval), enabled
    self.total_is_upper_bound = total_is_upper_bound
    self._log = _log_info if log_fn is None else log_fn
    self._clock = clock
    self.start = clock()
    self.count = 0
    self.updates = 0
    self._first_time: Optional[float] = None  # When the first update (compilation included) completed.
    self._first_count = 0
    self._last_line = self.start
    self._finished = False

  def rate(self, now: Optional[float] = None) -> Optional[float]:
    """Units per second: since the end of the first update once there are two (the first includes start-up
    and compilation), else since the start; None before any time has passed."""
    now = self._clock() if now is None else now
    if self.updates >= 2 and now > self._first_time:
      return (self.count - self._first_count) / (now - self._first_time)
    if self.updates >= 1 and now > self.start:
      return self.count / (now - self.start)
    return None

  def eta(self, now: Optional[float] = None) -> Optional[float]:
    """Seconds left at the current rate; None without a total or a rate."""
    rate = self.rate(now)
    if self.total is None or not rate:
      return None
    return max(0, self.total - self.count) / rate

  def update(self, n: int = 1, note: Optional[str] = None) -> None:
    """Counts n more finished units; logs a line if `interval` seconds passed since the last one (or the start).

    note: appended to the line if one is logged (e.g. 'loss 0.1234', already on the host).
    """
    now = self._clock()
    self.count += n
    self.updates += 1
    if self.updates == 1:
      self._first_time, self._first_count = now, self.count
    if not self.enabled or now - self._last_line < self.interval:
      return
    if self.total is not None and self.count >= self.total:
      return  # done() says it, in its summary line.
    self._last_line = now
    self._log(self.line(now, note))

  def line(self, now: Optional[float] = None, note: Optional[str] = None) -> str:
    """The progress line at time `now`: 'Sampling: 2,560/10,000 images (25.6%), 312 images/s, ETA 24 s'."""
    now = self._clock() if now is None else now
    bound = self.total is not None and self.total_is_upper_bound
    if self.total is None:
      parts = [f'{self.label}: {format_count(self.count)} {self.unit}']
    elif bound:
      parts = [f'{self.label}: {format_count(self.count)} of at most {format_count(self.total)} {self.unit}']
    else:
      parts = [f'{self.label}: {format_count(self.count)}/{format_count(self.total)} {self.unit}']
      if self.total:
        parts[0] += f' ({100.0 * self.count / self.total:.1f}%)'
    if self.updates < 2:  # A rate measured over the first update alone would count compilation as work.
      parts[0] += f' in {format_elapsed(now - self.start)} (start-up included; rate and ETA follow)'
    else:
      rate = self.rate(now)
      if rate is not None:
        parts.append(f'{format_rate(rate)} {self.unit}/s')
      eta = self.eta(now)
      if eta is not None:
        parts.append(f'ETA {"at most " if bound else ""}{format_duration(eta)}')
    if note:
      parts.append(note)
    return ', '.join(parts)

  def summary(self, now: Optional[float] = None, note: Optional[str] = None) -> str:
    """The final line: 'Sampling: 10,000 images in 31.9 s (313 images/s)', with the rate after the first update
    too where start-up (compilation) makes the overall rate misleading (the two >= 10% apart)."""
    now = self._clock() if now is None else now
    elapsed = now - self.start
    text = f'{self.label}: {format_count(self.count)} {self.unit} in {format_elapsed(elapsed)}'
    if elapsed > 0 and self.count:
      overall = self.count / elapsed
      rates = f'{format_rate(overall)} {self.unit}/s'
      steady = self.rate(now) if self.updates >= 2 else None
      if steady and abs(steady - overall) >= 0.1 * overall:
        rates += f'; {format_rate(steady)} {self.unit}/s after start-up'
      text += f' ({rates})'
    return text + (f', {note}' if note else '')

  def done(self, note: Optional[str] = None) -> None:
    """Logs the summary line (once, however often it is called)."""
    if self._finished:
      return
    self._finished = True
    if self.enabled:
      self._log(self.summary(note=note))
