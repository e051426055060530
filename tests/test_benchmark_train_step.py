"""benchmarks/train_step.py: its JSON on the tiny config, and that it runs with only its light dependencies.

The script runs in subprocesses of `python -S` (no site-packages) whose only packages are a directory of
symlinks to the installed files of jax, jaxlib, flax, optax, ml-collections and what they require
(transitively, with the extras they name), less TensorFlow, TFDS, Orbax, clu, Pillow and TensorBoard
(flax requires orbax-checkpoint: its files are left out too), plus the repository (cm_jax, configs). To
the script that is an installation without those packages: an `import tensorflow` (or of
cm_jax.input_pipeline, which needs Pillow) anywhere on the benchmark's import path makes these runs fail.
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'train_step.py')

LIGHT_DISTRIBUTIONS = ('jax', 'jaxlib', 'flax', 'optax', 'ml-collections')
HEAVY_MODULES = ('tensorflow', 'tensorflow_datasets', 'orbax', 'clu', 'PIL', 'tensorboard')

RECORD_TYPES = {
    'config': str, 'loss': str, 'precision': str, 'backend': str, 'device_kind': str, 'devices': int,
    'batch_size': int, 'image_shape': list, 'params': int, 'images_per_s': float, 'step_s': float,
    'compile_s': float, 'flops_per_step': float, 'flops_per_s': float, 'peak_flops': (float, type(None)),
    'peak_fraction': (float, type(None)), 'peak_flops_note': str, 'steps': int, 'warmup': int,
}


def _norm(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def requirement_closure(roots) -> set[str]:
  """The installed distributions that `roots` require, transitively, with the extras each requirement names
  (normalised names)."""
  seen, done, todo = set(), set(), [(_norm(r), frozenset()) for r in roots]
  while todo:
    name, extras = todo.pop()
    if (name, extras) in done:
      continue
    done.add((name, extras))
    try:
      requirements = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue  # An optional requirement that is not installed.
    seen.add(name)
    for requirement in requirements:
      needs_extra = re.findall(r"""\bextra\s*==\s*['"]([^'"]+)['"]""", requirement)
      if needs_extra and not extras & {_norm(e) for e in needs_extra}:
        continue
      match = re.match(r'\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?', requirement)
      wanted = frozenset(_norm(e) for e in (match.group(2) or '').split(',') if e.strip())
      todo.append((_norm(match.group(1)), wanted))
  return seen


@pytest.fixture(scope='module')
def light_site(tmp_path_factory):
  """A directory of symlinks to every installed file of the light distributions (and their __pycache__)."""
  owners = importlib.metadata.packages_distributions()
  heavy = {_norm(d) for m in HEAVY_MODULES for d in owners.get(m, ())}
  keep = requirement_closure(LIGHT_DISTRIBUTIONS) - heavy
  site = tmp_path_factory.mktemp('light_site')
  linked_dirs = set()
  for name in sorted(keep):
    dist = importlib.metadata.distribution(name)
    for file in dist.files or ():
      if file.parts[0] == '..' or '__pycache__' in file.parts:
        continue
      source = os.path.realpath(dist.locate_file(file))
      if not os.path.isfile(source):
        continue
      target = os.path.join(site, *file.parts)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if not os.path.lexists(target):
        os.symlink(source, target)
      cache = os.path.join(os.path.dirname(source), '__pycache__')
      if os.path.dirname(target) not in linked_dirs and os.path.isdir(cache):
        linked_dirs.add(os.path.dirname(target))  # Compiled files stay valid: same sources, same mtimes.
        if not os.path.lexists(os.path.join(os.path.dirname(target), '__pycache__')):
          os.symlink(cache, os.path.join(os.path.dirname(target), '__pycache__'))
  assert os.path.isdir(os.path.join(site, 'jax')) and os.path.isdir(os.path.join(site, 'ml_collections'))
  assert not any(os.path.lexists(os.path.join(site, m)) for m in HEAVY_MODULES)
  return str(site)


def run_light(site: str, *args, script=SCRIPT, timeout=900):
  """Runs `script` in `python -S` with only `site` and the repository importable."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, REPO_ROOT]))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # compile_s and the cost analysis of a real compilation.
  env.pop('PYTHONHOME', None)
  return subprocess.run([sys.executable, '-S', script, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                        env=env, timeout=timeout)


def records(result) -> list[dict]:
  assert result.returncode == 0, result.stderr[-4000:]
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  return [json.loads(line) for line in lines]


def check_record(record: dict, *, precision: str, batch_size: int) -> None:
  for key, types in RECORD_TYPES.items():
    assert isinstance(record.get(key), types), (key, record.get(key))
  assert record['precision'] == precision and record['batch_size'] == batch_size
  assert record['backend'] == jax.default_backend() and record['devices'] == jax.device_count()
  assert record['image_shape'] == [28, 28, 1] and record['params'] > 0
  for key in ('images_per_s', 'step_s', 'step_s_min', 'step_s_max', 'compile_s', 'flops_per_step', 'flops_per_s'):
    assert record[key] > 0, (key, record[key])
  assert record['step_s_min'] <= record['step_s'] <= record['step_s_max']
  assert record['flops_note'] is None
  assert math.isclose(record['images_per_s'], batch_size / record['step_s'], rel_tol=2e-3)
  assert math.isclose(record['flops_per_s'], record['flops_per_step'] / record['step_s'], rel_tol=2e-3)
  if record['peak_flops'] is not None:
    assert record['peak_flops'] > 0
    assert math.isclose(record['peak_fraction'], record['flops_per_s'] / record['peak_flops'], rel_tol=2e-3)
  assert math.isfinite(record['last_loss'])


@pytest.fixture(scope='module')
def bench():
  """The script imported as a module (its flags are defined only when it runs as a script)."""
  spec = importlib.util.spec_from_file_location('benchmark_train_step', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_config_both_precisions_class_conditional(light_site):
  result = run_light(light_site, '--config=configs/test.py', '--steps=2', '--warmup=1', '--precision=fp32,bf16',
                     '--config.model.class_conditional=True', '--config.model.num_classes=10')
  lines = records(result)
  assert [r['precision'] for r in lines] == ['float32', 'bfloat16']
  for record in lines:
    check_record(record, precision=record['precision'], batch_size=8)
    assert record['config'] == 'configs/test.py' and record['loss'] == 'ct' and record['steps'] == 2
    assert record['model']['class_conditional'] is True and record['model']['ch_mult'] == [1, 2]


def test_sweep_of_distillation_with_overrides(light_site):
  """'cd' (a random teacher), the sweep mode, --batch_size and --peak_flops, still with light imports only."""
  result = run_light(light_site, '--sweep=configs/test.py:cd', '--precision=bf16', '--batch_size=4',
                     '--peak_flops=1e12', '--steps=2', '--warmup=0')
  (record,) = records(result)
  check_record(record, precision='bfloat16', batch_size=4)
  assert record['config'] == 'configs/test.py:cd' and record['loss'] == 'cd'
  assert record['peak_flops'] == 1e12 and record['peak_flops_note'] == '--peak_flops'


def test_the_light_site_lacks_the_heavy_packages(light_site, tmp_path):
  """Controls: in the same set-up a script that imports TensorFlow, Orbax or the data pipeline (Pillow) fails,
  and one that imports the light packages runs."""
  for line in ('import tensorflow', 'import orbax.checkpoint', 'import cm_jax.input_pipeline',
               'from cm_jax import inference'):
    script = tmp_path / 'heavy.py'
    script.write_text(line + '\n')
    result = run_light(light_site, script=str(script), timeout=300)
    assert result.returncode != 0 and 'ModuleNotFoundError' in result.stderr, (line, result.stderr[-2000:])
  script = tmp_path / 'light.py'
  script.write_text('import sys, flax.linen, optax, ml_collections, cm_jax.core.losses\n'
                    'assert "site-packages" not in " ".join(sys.path), sys.path\n')
  result = run_light(light_site, script=str(script), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_flops_from_cost_analysis_forms(bench):
  assert bench.flops_from_cost_analysis({'flops': 10.0, 'bytes accessed': 3.0}) == (10.0, None)
  assert bench.flops_from_cost_analysis([{'flops': 10.0}, {'flops': 5.0}]) == (15.0, None)
  for bad in (None, [], {}, [{'bytes accessed': 1.0}], {'flops': -1.0}, {'flops': float('nan')}, 'flops', [1]):
    flops, note = bench.flops_from_cost_analysis(bad)
    assert flops is None and isinstance(note, str) and note, bad


def test_peak_table_and_cpu_estimate(bench):
  assert bench.device_peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16')[0] == 989e12
  assert bench.device_peak_flops('NVIDIA H200', 'float32')[0] == 67e12
  assert bench.device_peak_flops('NVIDIA H100 PCIe', 'bfloat16')[0] == 756e12
  assert bench.device_peak_flops('NVIDIA A100-SXM4-80GB', 'float32')[0] == 19.5e12
  assert bench.device_peak_flops('TPU v4', 'bfloat16')[0] == 275e12
  assert bench.device_peak_flops('TPU v5 lite', 'bfloat16')[0] == 197e12
  assert bench.device_peak_flops('TPU v5p', 'bfloat16')[0] == 459e12
  assert bench.device_peak_flops('TPU v6 lite', 'bfloat16')[0] == 918e12
  peak, note = bench.device_peak_flops('Some Future Chip', 'bfloat16')
  assert peak is None and '--peak_flops' in note

  avx512 = 'processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu sse2 avx2 fma avx512f\n'
  assert bench.cpu_peak_flops(avx512, 4)[0] == pytest.approx(4 * 2.0e9 * 64)
  assert bench.cpu_peak_flops(avx512.replace(' avx512f', ''), 4)[0] == pytest.approx(4 * 2.0e9 * 32)
  assert bench.cpu_peak_flops('flags\t\t: fpu\n', 4)[0] is None
  hyperthreaded = avx512 + 'siblings\t: 8\ncpu cores\t: 4\n'  # 2 threads per core: 4 CPUs are 2 cores.
  assert bench.cpu_peak_flops(hyperthreaded, 4)[0] == pytest.approx(2 * 2.0e9 * 64)

  class Device:
    platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'
  assert bench.peak_flops_for([Device()] * 8, 'bfloat16')[0] == 8 * 989e12
  assert bench.peak_flops_for([Device()] * 8, 'bfloat16', override=5e15) == (5e15, '--peak_flops')


def test_precision_names(bench):
  assert [bench.canonical_precision(p) for p in ('fp32', 'BF16', 'float32', 'bfloat16')] == [
      'float32', 'bfloat16', 'float32', 'bfloat16']
  with pytest.raises(ValueError, match='fp16'):
    bench.canonical_precision('fp16')
