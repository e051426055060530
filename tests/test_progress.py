"""cm_jax.runtime.progress with a fake clock and a captured log: exact lines, rates, ETAs and throttling."""

import subprocess
import sys

import pytest

from cm_jax.runtime import progress as progress_lib


class FakeClock:
  """A clock the test advances by hand, so every rate and ETA is exact."""

  def __init__(self, t: float = 1000.0):
    self.t = t

  def __call__(self) -> float:
    return self.t

  def advance(self, seconds: float) -> None:
    self.t += seconds


def make(total=10_000, unit='images', label='Sampling', **kwargs):
  clock, lines = FakeClock(), []
  p = progress_lib.Progress(label, total=total, unit=unit, clock=clock, log_fn=lines.append, **kwargs)
  return p, clock, lines


@pytest.mark.parametrize('seconds, text', [
    (0, '0 s'), (0.4, '0 s'), (45, '45 s'), (59.4, '59 s'), (59.6, '1 min 00 s'), (200, '3 min 20 s'),
    (3599, '59 min 59 s'), (3600, '1 h 00 min'), (3900, '1 h 05 min'), (100_000, '27 h 47 min'), (-3, '0 s')])
def test_format_duration(seconds, text):
  assert progress_lib.format_duration(seconds) == text


@pytest.mark.parametrize('rate, text', [
    (12_345.6, '12,346'), (312.4, '312'), (31.24, '31.2'), (3.124, '3.12'), (0.3124, '0.312'), (0.001234, '0.00123')])
def test_format_rate(rate, text):
  assert progress_lib.format_rate(rate) == text


def test_format_count_and_elapsed():
  assert progress_lib.format_count(1_234_567) == '1,234,567'
  assert progress_lib.format_elapsed(31.94) == '31.9 s'
  assert progress_lib.format_elapsed(200.0) == '3 min 20 s'


def test_rate_and_eta_exclude_the_first_update():
  """The first batch takes 30 s (compilation); then 256 images every 0.8 s = 320 images/s."""
  p, clock, lines = make(interval=1e9)
  clock.advance(30.0)
  p.update(256)
  assert p.rate() == pytest.approx(256 / 30.0)  # One update: all there is.
  for _ in range(9):
    clock.advance(0.8)
    p.update(256)
  assert p.count == 2560
  assert p.rate() == pytest.approx(320.0)  # 2304 images in 7.2 s, compilation excluded.
  assert p.eta() == pytest.approx((10_000 - 2560) / 320.0)
  assert p.line() == 'Sampling: 2,560/10,000 images (25.6%), 320 images/s, ETA 23 s'
  assert not lines  # interval=1e9: nothing logged yet.


def test_first_line_after_interval_then_throttled():
  p, clock, lines = make(total=100, unit='steps', label='Classifier training', interval=10.0)
  clock.advance(4.0)
  p.update(10)  # 4 s < interval: silent.
  assert lines == []
  clock.advance(4.0)
  p.update(10)  # 8 s: silent.
  clock.advance(4.0)
  p.update(10)  # 12 s since the start: the first line. Rate 20 steps in 8 s since the first update.
  assert lines == ['Classifier training: 30/100 steps (30.0%), 2.50 steps/s, ETA 28 s']
  clock.advance(4.0)
  p.update(10)  # 4 s since the last line: silent.
  clock.advance(4.0)
  p.update(10)  # 8 s: silent.
  assert len(lines) == 1
  clock.advance(4.0)
  p.update(10, note='loss 0.1234')  # 12 s since the last line.
  assert lines[1] == 'Classifier training: 60/100 steps (60.0%), 2.50 steps/s, ETA 16 s, loss 0.1234'


def test_a_long_first_update_logs_without_a_rate():
  """A first batch longer than the interval (compilation) is reported, without a rate that would count it."""
  p, clock, lines = make()
  clock.advance(35.2)
  p.update(256)
  assert lines == ['Sampling: 256/10,000 images (2.6%) in 35.2 s (start-up included; rate and ETA follow)']


def test_short_job_logs_only_the_summary():
  p, clock, lines = make(total=1000)
  for _ in range(4):
    clock.advance(2.0)
    p.update(250)
  assert lines == []  # 8 s < interval.
  p.done()
  p.done()  # Once only.
  assert lines == ['Sampling: 1,000 images in 8.0 s (125 images/s)']


def test_summary_of_a_long_job_and_the_rate_after_start_up():
  p, clock, lines = make(total=10_000)
  clock.advance(20.0)  # Compilation.
  p.update(2000)
  for _ in range(4):
    clock.advance(2.0)
    p.update(2000)  # 1000 images/s.
  assert len(lines) == 1  # The first update (20 s); the last update leaves its word to done().
  p.done(note='wrote x.npz')
  assert lines[-1] == ('Sampling: 10,000 images in 28.0 s (357 images/s; 1,000 images/s after start-up), '
                       'wrote x.npz')


def test_summary_omits_a_steady_rate_close_to_the_overall_one():
  p, clock, lines = make(total=3000)
  for _ in range(3):
    clock.advance(10.0)
    p.update(1000)
  p.done()
  assert lines[-1] == 'Sampling: 3,000 images in 30.0 s (100 images/s)'


def test_long_summary_and_eta_use_minutes_and_hours():
  p, clock, lines = make(total=1_000_000, interval=60.0)
  clock.advance(5.0)
  p.update(100)
  clock.advance(60.0)
  p.update(6000)  # 100 images/s: 993,900 left is 2 h 46 min.
  assert lines[-1] == 'Sampling: 6,100/1,000,000 images (0.6%), 100 images/s, ETA 2 h 46 min'
  clock.advance(135.0)
  p.update(13_500)
  assert lines[-1] == 'Sampling: 19,600/1,000,000 images (2.0%), 100 images/s, ETA 2 h 43 min'
  p.done()
  assert lines[-1] == 'Sampling: 19,600 images in 3 min 20 s (98.0 images/s)'


def test_unknown_total_and_disabled():
  p, clock, lines = make(total=None, unit='candidates', label='Search')
  for _ in range(3):
    clock.advance(6.0)
    p.update()
  assert lines == ['Search: 2 candidates, 0.167 candidates/s']  # No percentage, no ETA.
  p, clock, lines = make(enabled=False)
  clock.advance(60.0)
  p.update(5000)
  clock.advance(60.0)
  p.update(5000)
  p.done()
  assert lines == [] and p.count == 10_000  # Processes other than 0 count but stay silent.


def test_upper_bound_total():
  """A search that may stop early: no percentage, and the ETA is an upper bound."""
  p, clock, lines = make(total=8, unit='candidates', label='Two-step search', total_is_upper_bound=True)
  for _ in range(3):
    clock.advance(60.0)
    p.update()
  assert lines[-1] == 'Two-step search: 3 of at most 8 candidates, 0.0167 candidates/s, ETA at most 5 min 00 s'
  p.done()  # Stopped after 3 of at most 8.
  assert lines[-1] == 'Two-step search: 3 candidates in 3 min 00 s (0.0167 candidates/s)'


def test_default_log_fn_uses_absl_info(monkeypatch):
  got = []
  monkeypatch.setattr(progress_lib.logging, 'info', lambda fmt, *args: got.append(fmt % args))
  clock = FakeClock()
  p = progress_lib.Progress('Editing', total=4, unit='images', clock=clock)
  clock.advance(1.0)
  p.update(4)
  p.done()
  assert got == ['Editing: 4 images in 1.0 s (4.00 images/s)']


def test_no_jax_import():
  """The helper stays importable (and cheap) without jax: it is pure Python."""
  code = 'import sys; import cm_jax.runtime.progress; assert "jax" not in sys.modules, sorted(sys.modules)'
  subprocess.run([sys.executable, '-c', code], check=True)


# ------------------------------------------------------------------------------ The loops that report.
@pytest.fixture
def logged(monkeypatch):
  """The lines the loops' Progress objects log (their default log function, absl INFO)."""
  lines = []
  monkeypatch.setattr(progress_lib, '_log_info', lines.append)
  return lines


def test_sample_in_batches_reports_images(logged):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax import samplers  # pylint: disable=g-import-not-at-top

  def sample_fn(params, keys, spec, shape, labels):  # A host function: no mesh, no compilation.
    return np.full(shape, 0.5, np.float32)

  spec = samplers.Sampler('consistency', 2, (0.8213,), sigma_min=0.002, sigma_max=80.0, rho=7.0, clip=True)
  x = samplers.sample_in_batches(sample_fn, None, spec, 10, 0, 4, (2, 2, 1))
  assert x.shape == (10, 2, 2, 1)
  assert len(logged) == 1 and logged[0].startswith('Sampling (2-step consistency, times 0.8213): 10 images in ')
  heun = samplers.Sampler('heun', 18, sigma_min=0.002, sigma_max=80.0, rho=7.0, clip=True)
  samplers.sample_in_batches(sample_fn, None, heun, 3, 0, 4, (2, 2, 1))
  assert logged[-1].startswith('Sampling (EDM heun, 18 steps): 3 images in ')
  samplers.sample_in_batches(sample_fn, None, spec, 3, 0, 4, (2, 2, 1), progress_label='Grid')
  assert logged[-1].startswith('Grid: 3 images in ')


def test_feature_batches_are_fn_batches(logged):
  """Inception features, one batch at a time for progress: the same batches, so the same rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  calls = []

  def fn(x):
    calls.append(len(x))
    return x.reshape(len(x), 4).astype(np.float32), np.ones((len(x), 3), np.float32) / 3

  images = np.arange(7 * 4, dtype=np.uint8).reshape(7, 2, 2, 1)
  features, probs = evaluator.batches_with_progress(fn, 3, 'Reference features (Inception)')(images)
  np.testing.assert_array_equal(features, images.reshape(7, -1))
  assert probs.shape == (7, 3) and calls == [3, 3, 1]
  assert len(logged) == 1 and logged[0].startswith('Reference features (Inception): 7 images in ')
  empty = evaluator.batches_with_progress(fn, 3, 'x')(images[:0])
  assert empty[0].shape == (0, 4) and len(logged) == 1  # fn's own answer for no images; nothing logged.


def _most_evaluations_by_enumeration(lo, hi):
  """Every comparison outcome of two_step_search.ternary_search, enumerated: the most distinct indices evaluated."""
  most = 0

  def walk(lo, hi, seen):
    nonlocal most
    if hi - lo >= 3:
      m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
      walk(lo, m2 - 1, seen | {m1, m2})
      walk(m1 + 1, hi, seen | {m1, m2})
    else:
      most = max(most, len(seen | set(range(lo, hi + 1))))
  walk(lo, hi, frozenset())
  return most


def test_max_ternary_evaluations():
  from cm_jax.evaluation import two_step_search  # pylint: disable=g-import-not-at-top
  for lo, hi in [(1, p - 2) for p in range(3, 60)] + [(0, 0), (3, 3), (0, 2)]:
    assert two_step_search.max_ternary_evaluations(lo, hi) == _most_evaluations_by_enumeration(lo, hi), (lo, hi)
  assert two_step_search.max_ternary_evaluations(1, 16) == 8 and two_step_search.max_ternary_evaluations(5, 4) == 0


def test_two_step_search_counts_candidates(logged):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import two_step_search  # pylint: disable=g-import-not-at-top
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  result = two_step_search.search_two_step_time(lambda t: {'fd': float(np.log(t / 0.585) ** 2)}, 'fd',
                                                test_config.get_config(), 18)
  assert result['best_index'] == 11
  assert logged == [f"Two-step search: {len(result['evaluated'])} candidates in " + logged[0].split(' in ', 1)[1]]
  assert len(result['evaluated']) <= two_step_search.max_ternary_evaluations(1, 16)


def test_classifier_training_and_features_report(logged):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 8, 8, 1)).astype(np.uint8)
  labels = (np.arange(8) % 2).astype(np.int32)
  classifier.train_classifier(images, labels, images[:5], labels[:5], steps=3, batch_size=4, lr=1e-3, seed=0,
                              num_classes=2)
  assert logged[0].startswith('Classifier training: 3 steps in ') and ', loss ' in logged[0]
  assert logged[1].startswith('Classifier test-set features: 5 images in ')
  assert len(logged) == 2
