r"""Speed of the compiled train step on synthetic batches; prints one JSON object per line.

  python benchmarks/train_step.py --config=configs/fashion_mnist_ct.py [--steps=20 --warmup=2]
      [--precision=fp32,bf16] [--batch_size=N] [--peak_flops=F] [--config.model.ch=48 ...]
  python benchmarks/train_step.py --sweep=ct [--batch_size=N]        # CIFAR-10 and ImageNet-64 iCT, fp32 and bf16
  python benchmarks/train_step.py --sweep=configs/cifar10_edm.py,configs/test.py:cd --precision=bf16

Times cm_jax.train_step.train_step exactly as cm_jax/train.py compiles it (a ('data',) mesh over every device,
the state replicated, the batch sharded along its first axis, the state donated) on random uint8 images of the
config's shape (and random int32 labels for a class-conditional model). For 'cd' a randomly initialised network
of the student's architecture stands in for the EDM teacher (the cost is the same), so no teacher workdir is
needed. No data is read: the script imports only jax, flax, optax, ml-collections (with their own
dependencies, absl among them) and cm_jax's light modules.

One line per (config, precision), with the keys
  config, loss, precision, backend, device_kind, devices, batch_size, image_shape, params,
  images_per_s      batch_size / step_s,
  step_s            median wall time of the timed steps, each dispatched and waited for (block_until_ready)
                    after `--warmup` untimed steps; step_s_min and step_s_max beside it,
  compile_s         lowering + XLA compilation of the step,
  flops_per_step    XLA's cost analysis of the compiled step (per-device program x devices), null if XLA gives
                    none (flops_note says why),
  flops_per_s       flops_per_step / step_s,
  peak_flops        the devices' peak for this precision (table below, a CPU estimate, or --peak_flops),
                    null if unknown (peak_flops_note says where the number comes from, or why it is missing),
  peak_fraction     flops_per_s / peak_flops: the model FLOP utilisation,
and steps, warmup, xla_disable_most_optimizations (training.disable_most_optimizations, applied as training
applies it), jax_version. Progress and errors go to stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cm_jax import train_state as ts  # pylint: disable=g-import-not-at-top
from cm_jax.core import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
from cm_jax.core import losses  # pylint: disable=g-import-not-at-top
from cm_jax.data import catalog  # pylint: disable=g-import-not-at-top
from cm_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
from cm_jax.train_step import train_step  # pylint: disable=g-import-not-at-top
from cm_jax.train_step import UpdateSettings  # pylint: disable=g-import-not-at-top

XLA_NOTE = xla_flags.apply()  # Training's XLA CPU settings (cm_jax/runtime/xla_flags.py), before any computation.

DEFAULT_CONFIG = 'configs/fashion_mnist_ct.py'
PRECISIONS = {'float32': 'float32', 'fp32': 'float32', 'f32': 'float32',
              'bfloat16': 'bfloat16', 'bf16': 'bfloat16'}
SWEEPS = {
    # The CIFAR-10 and 64x64 iCT steps, the two sizes the paper configs train at.
    'ct': ('configs/cifar10_ct.py', 'configs/imagenet64_ct.py'),
    'rgb': ('configs/cifar10_ct.py', 'configs/cifar10_edm.py', 'configs/cifar10_cd.py', 'configs/cifar10_ect.py',
            'configs/imagenette_ct.py', 'configs/imagenette_edm.py', 'configs/imagenette_cd.py',
            'configs/imagenet64_edm.py', 'configs/imagenet64_ct.py', 'configs/imagenet64_cd.py'),
    'fashion_mnist': ('configs/fashion_mnist_ct.py', 'configs/fashion_mnist_edm.py', 'configs/fashion_mnist_cd.py',
                      'configs/fashion_mnist_ect.py'),
}

# Dense peak FLOP/s of one device, from the vendors' datasheets (NVIDIA's H100/H200 and A100 datasheets; Google
# Cloud's TPU system-architecture pages), without structured sparsity. Matched in order against
# jax.Device.device_kind (lower case), so the more specific names come first.
# float32 on NVIDIA GPUs: the CUDA-core (non-tensor-core) rate. XLA may run float32 convolutions and matmuls as
# TF32 on the tensor cores (several times faster), so a float32 peak_fraction above 1 is possible there.
# TPUs: XLA:TPU's default matmul precision computes float32 products in bf16 passes on the MXU, so the bf16 rate
# is the ceiling for both precisions.
PEAK_FLOPS: tuple[tuple[str, dict[str, float], str], ...] = (
    ('h100 pcie', {'bfloat16': 756e12, 'float32': 51e12}, 'NVIDIA H100 PCIe datasheet'),
    ('h100', {'bfloat16': 989e12, 'float32': 67e12}, 'NVIDIA H100 SXM datasheet'),
    ('h200', {'bfloat16': 989e12, 'float32': 67e12}, 'NVIDIA H200 SXM datasheet'),
    ('a100', {'bfloat16': 312e12, 'float32': 19.5e12}, 'NVIDIA A100 datasheet'),
    ('tpu v4', {'bfloat16': 275e12, 'float32': 275e12}, 'Google Cloud TPU v4 (bf16 MXU rate)'),
    ('tpu v5 lite', {'bfloat16': 197e12, 'float32': 197e12}, 'Google Cloud TPU v5e (bf16 MXU rate)'),
    ('tpu v5e', {'bfloat16': 197e12, 'float32': 197e12}, 'Google Cloud TPU v5e (bf16 MXU rate)'),
    ('tpu v5p', {'bfloat16': 459e12, 'float32': 459e12}, 'Google Cloud TPU v5p (bf16 MXU rate)'),
    ('tpu v5', {'bfloat16': 459e12, 'float32': 459e12}, 'Google Cloud TPU v5p (bf16 MXU rate)'),
    ('tpu v6 lite', {'bfloat16': 918e12, 'float32': 918e12}, 'Google Cloud TPU v6e (bf16 MXU rate)'),
    ('tpu v6e', {'bfloat16': 918e12, 'float32': 918e12}, 'Google Cloud TPU v6e (bf16 MXU rate)'),
)


# ------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested).
# ------------------------------------------------------------------------------------------------
def canonical_precision(name: str) -> str:
  """'fp32' / 'f32' / 'float32' -> 'float32'; 'bf16' / 'bfloat16' -> 'bfloat16'."""
  key = name.strip().lower()
  if key not in PRECISIONS:
    raise ValueError(f'Unknown precision {name!r}; use one of {sorted(PRECISIONS)}.')
  return PRECISIONS[key]


def flops_from_cost_analysis(cost: Any) -> tuple[Optional[float], Optional[str]]:
  """The 'flops' of a Compiled.cost_analysis() result: (flops, None), or (None, why not).

  jax returns a dict (recent releases) or a list of dicts, one per HLO module (older ones); the flops of a
  list are summed over its entries.
  """
  if cost is None:
    return None, 'XLA gave no cost analysis for this backend'
  entries = [cost] if isinstance(cost, dict) else list(cost) if isinstance(cost, (list, tuple)) else None
  if entries is None or not all(isinstance(e, dict) for e in entries):
    return None, f'unrecognised cost analysis of type {type(cost).__name__}'
  values = [e['flops'] for e in entries if e.get('flops') is not None]
  if not values:
    return None, "XLA's cost analysis has no 'flops' entry"
  total = float(sum(values))
  if not math.isfinite(total) or total <= 0:
    return None, f"XLA's cost analysis gave flops = {total}"
  return total, None


def device_peak_flops(device_kind: str, precision: str) -> tuple[Optional[float], str]:
  """(peak FLOP/s of one device of this kind at this precision, source), or (None, why not) if unknown."""
  kind = device_kind.lower()
  for pattern, peaks, source in PEAK_FLOPS:
    if pattern in kind:
      return peaks[precision], f'{source}, dense {precision}, per device'
  return None, f'device kind {device_kind!r} is not in the peak table: pass --peak_flops'


def cpu_peak_flops(cpuinfo: str, cpus: int) -> tuple[Optional[float], str]:
  """A rough peak of the `cpus` logical CPUs this process may use, from /proc/cpuinfo text: physical cores x
  clock x float32 FLOPs per cycle.

  FLOPs per cycle per core: AVX-512 with FMA 64 (16 float32 lanes x 2 for the fused multiply-add x 2 FMA
  units, assumed), AVX2 with FMA 32, else 8. The same for bf16: XLA:CPU does not use AMX or AVX-512 BF16 for
  the whole step. Hyper-threads share a core's FMA units: cores = cpus x 'cpu cores' / 'siblings'. cpuinfo's
  clock is the nominal one (turbo is higher, a shared or virtual CPU lower).
  """
  def first(field):
    found = re.findall(rf'^{field}\s*:\s*(.*)$', cpuinfo, re.M)
    return found[0].strip() if found else None

  flags = set((first('flags') or '').split())
  mhz = first('cpu MHz')
  if mhz is None or cpus < 1:
    return None, 'no clock rate in /proc/cpuinfo: pass --peak_flops'
  ghz = float(mhz) / 1e3
  siblings, per_socket = first('siblings'), first('cpu cores')
  threads_per_core = int(siblings) / int(per_socket) if siblings and per_socket and int(per_socket) else 1.0
  cores = max(1, round(cpus / max(threads_per_core, 1.0)))
  if 'avx512f' in flags and 'fma' in flags:
    per_cycle, isa = 64, 'AVX-512 FMA, 2 units assumed'
  elif 'avx2' in flags and 'fma' in flags:
    per_cycle, isa = 32, 'AVX2 FMA, 2 units assumed'
  else:
    per_cycle, isa = 8, 'no FMA: SSE estimate'
  return cores * ghz * 1e9 * per_cycle, (f'estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} float32 '
                                         f'FLOP/cycle ({isa}); every CPU this process may use')


def peak_flops_for(devices: Sequence[Any], precision: str, override: float = 0.0) -> tuple[Optional[float], str]:
  """Peak FLOP/s of all `devices` together at `precision`, and where the number comes from."""
  if override > 0:
    return float(override), '--peak_flops'
  platform = devices[0].platform
  if platform == 'cpu':  # Every CPU device (fake devices included) shares the same cores: one CPU's peak.
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo = f.read()
    except OSError:
      return None, 'no /proc/cpuinfo on this machine: pass --peak_flops'
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 0)
    return cpu_peak_flops(cpuinfo, cpus)
  per_device, note = device_peak_flops(devices[0].device_kind, precision)
  if per_device is None:
    return None, note
  return per_device * len(devices), f'{note} x {len(devices)} devices'


def significant(x: Optional[float], digits: int = 4) -> Optional[float]:
  """x rounded to `digits` significant digits (None stays None)."""
  if x is None or x == 0 or not math.isfinite(x):
    return x
  return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------
def resolve_path(path: str) -> str:
  """A config path as given if it exists, else relative to the repository root."""
  return path if os.path.exists(path) else os.path.join(REPO_ROOT, path)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'path/to/config.py[:arg]' -> get_config() or get_config(arg), as --config=... reads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('benchmark_config', resolve_path(path))
  if module_spec is None:
    raise ValueError(f'Cannot load the config file {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def with_overrides(config: ml_collections.ConfigDict, precision: Optional[str],
                   batch_size: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if precision is not None:
      config.training.precision = precision
    if batch_size > 0:
      config.training.batch_size = batch_size
  return config


# ------------------------------------------------------------------------------------------------
# The benchmark.
# ------------------------------------------------------------------------------------------------
def synthetic_batch(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int], sharding, seed: int = 0):
  """Random uint8 images (and int32 labels for a class-conditional model) as global arrays laid out by
  `sharding` (every process draws the same batch and places its own rows)."""
  rng = np.random.default_rng(seed)
  batch_size = config.training.batch_size
  images = rng.integers(0, 256, (batch_size,) + tuple(image_shape), np.uint8)
  labels = (rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)
            if config.model.class_conditional else None)
  place = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return place(images), None if labels is None else place(labels)


def benchmark(config: ml_collections.ConfigDict, *, name: str, steps: int, warmup: int,
              peak_flops: float = 0.0) -> dict[str, Any]:
  """Compiles and times the train step of `config`; returns the JSON record (see the module docstring)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}.')
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', previous or config.training.disable_most_optimizations)
  try:
    return _benchmark(config, name, steps, warmup, peak_flops)
  finally:  # A process-wide setting: leave it as it was for the next config of a sweep.
    jax.config.update('jax_disable_most_optimizations', previous)


def _benchmark(config: ml_collections.ConfigDict, name: str, steps: int, warmup: int,
               peak_override: float) -> dict[str, Any]:
  tc = config.training
  devices = jax.devices()
  if tc.batch_size % len(devices):
    raise ValueError(f'batch size {tc.batch_size} does not divide by the {len(devices)} devices; pass '
                     f'--batch_size={max(len(devices), tc.batch_size // len(devices) * len(devices))}.')
  mesh = Mesh(np.asarray(devices), ('data',))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))

  image_shape = catalog.image_shape(config.data)
  tx = ts.make_optimizer(config)
  abstract_state = jax.eval_shape(functools.partial(ts.init_state, config, tx))
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  state = jax.jit(functools.partial(ts.init_state, config, tx), out_shardings=state_sharding)()
  teacher, teacher_params = None, None
  if config.loss.name in ('cd', 'scd'):  # A random network of the student's architecture stands in for the teacher.
    teacher_config = config.copy_and_resolve_references()
    with teacher_config.unlocked():
      teacher_config.loss.name = 'edm'
    teacher = denoiser_lib.make_denoiser(teacher_config)
    teacher_params = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p), out_shardings=replicated)(state.params)
  objective = losses.make_loss(config, image_shape, denoiser_lib.make_denoiser(config, training=True), teacher)
  step_fn = jax.jit(functools.partial(train_step, loss_fn=objective.loss_fn, target_decay=objective.target_decay,
                                      tx=tx, settings=UpdateSettings.of(config)),
                    in_shardings=(state_sharding, batch_sharding, replicated),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  batch = synthetic_batch(config, image_shape, batch_sharding)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, teacher_params).compile()
  compile_s = time.perf_counter() - t0
  try:
    per_device_flops, flops_note = flops_from_cost_analysis(compiled.cost_analysis())
  except Exception as e:  # pylint: disable=broad-except
    per_device_flops, flops_note = None, f'cost_analysis() failed: {type(e).__name__}: {e}'
  # The compiled program is one device's share of the SPMD step: the step's total is devices times it.
  flops_per_step = None if per_device_flops is None else per_device_flops * len(devices)

  for _ in range(warmup):
    state, metrics = compiled(state, batch, teacher_params)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, teacher_params)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  loss_value = float(jax.device_get(metrics['loss'])) if 'loss' in metrics else None
  step_s = statistics.median(times)
  flops_per_s = None if flops_per_step is None else flops_per_step / step_s
  peak, peak_note = peak_flops_for(devices, tc.precision, peak_override)
  return {
      'config': name,
      'loss': config.loss.name,
      'precision': tc.precision,
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind,
      'devices': len(devices),
      'batch_size': tc.batch_size,
      'image_shape': list(image_shape),
      'params': sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_state.params)),
      'model': config.model.to_dict(),
      'images_per_s': significant(tc.batch_size / step_s),
      'step_s': significant(step_s),
      'step_s_min': significant(min(times)),
      'step_s_max': significant(max(times)),
      'compile_s': significant(compile_s, 3),
      'flops_per_step': flops_per_step,
      'flops_per_s': significant(flops_per_s),
      'peak_flops': significant(peak, 6),
      'peak_fraction': None if flops_per_s is None or peak is None else significant(flops_per_s / peak),
      'flops_note': flops_note,
      'peak_flops_note': peak_note,
      'steps': steps,
      'warmup': warmup,
      'last_loss': None if loss_value is None else significant(loss_value),
      'xla_disable_most_optimizations': bool(jax.config.read('jax_disable_most_optimizations')),
      'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'xla_note': XLA_NOTE,
  }


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def define_flags():
  """The flags (absl, through ml-collections' config_flags); defined only when run as a script."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', resolve_path(DEFAULT_CONFIG),
                                  'Config file (path[:arg]); --config.a.b=v overrides its fields.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed steps (step_s is their median).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps between compilation and the timed steps.')
  flags.DEFINE_list('precision', [], "Comma-separated precisions (float32|fp32, bfloat16|bf16), one line each. "
                    "Default: the config's training.precision; with --sweep, float32 and bfloat16.")
  flags.DEFINE_integer('batch_size', 0, 'Global batch size instead of the config\'s (0: the config\'s).')
  flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s of all devices together at the benchmarked precision '
                     '(0: from the device table, or an estimate on CPU).')
  flags.DEFINE_string('sweep', '', f'A named sweep ({", ".join(sorted(SWEEPS))}) or comma-separated config files '
                      '(path[:arg]), run in one process instead of --config (whose --config.* overrides then do '
                      'not apply).')
  return flags.FLAGS


def run_all(runs: Sequence[tuple[str, ml_collections.ConfigDict]], steps: int, warmup: int,
            peak_flops: float) -> int:
  """Benchmarks each (name, config), printing its line as it finishes; the exit status (1 if any failed)."""
  failed = 0
  for name, config in runs:
    print(f'[train_step benchmark] {name} {config.training.precision} batch {config.training.batch_size}...',
          file=sys.stderr, flush=True)
    try:
      record = benchmark(config, name=name, steps=steps, warmup=warmup, peak_flops=peak_flops)
    except Exception as e:  # pylint: disable=broad-except
      if len(runs) == 1:
        raise
      failed += 1
      record = {'config': name, 'precision': config.training.precision, 'error': f'{type(e).__name__}: {e}'}
    print(json.dumps(record), flush=True)
  return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
  del argv
  flags_ = FLAGS
  # compile_s is a real compilation (and its cost analysis XLA's own), never a load from a persistent cache.
  jax.config.update('jax_enable_compilation_cache', False)
  precisions = [canonical_precision(p) for p in flags_.precision]
  if flags_.sweep:
    names = SWEEPS.get(flags_.sweep, tuple(s for s in flags_.sweep.split(',') if s))
    precisions = precisions or ['float32', 'bfloat16']
    runs = [(name, with_overrides(load_config(name), p, flags_.batch_size)) for name in names for p in precisions]
  else:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    name = config_flags.get_config_filename(flags_['config'])
    runs = [(name, with_overrides(flags_.config, p, flags_.batch_size)) for p in (precisions or [None])]
  return run_all(runs, flags_.steps, flags_.warmup, flags_.peak_flops)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
