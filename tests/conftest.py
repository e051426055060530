"""Shared test set-up: two fake CPU devices (so sharding is exercised), fast compiles, repo root on sys.path."""

import importlib.metadata
import os
import sys
import tempfile

# Must happen before jax is imported anywhere.
_flags = ['--xla_force_host_platform_device_count=2']
try:
  # The thunk runtime of XLA:CPU compiles the UNet ~2x slower. The flag exists in the jaxlib releases we
  # tested (0.10.x) and may vanish later; an unknown XLA flag is fatal, so only set it for those.
  if importlib.metadata.version('jaxlib').startswith('0.10.'):
    _flags.append('--xla_cpu_use_thunk_runtime=false')
except importlib.metadata.PackageNotFoundError:
  pass
os.environ.setdefault('XLA_FLAGS', ' '.join(_flags))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

# Identical programs (the same train step in several runs) compile once per session.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='cm_jax_test_xla_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def preempt_at(monkeypatch):
  """preempt_at(k) arms a kill: the next training run saves its step-k checkpoint, then dies (KeyboardInterrupt)."""
  from cm_jax import checkpointing  # pylint: disable=g-import-not-at-top
  save = checkpointing.save

  def arm(step: int) -> None:
    def save_then_preempt(manager, state, *args):
      save(manager, state, *args)
      if int(state.step) == step:
        manager.wait_until_finished()
        monkeypatch.setattr(checkpointing, 'save', save)  # Disarmed: the restarted run saves normally.
        raise KeyboardInterrupt(f'simulated preemption after the step-{step} checkpoint')
    monkeypatch.setattr(checkpointing, 'save', save_then_preempt)

  return arm
