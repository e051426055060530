"""Sampling, editing and feature extraction split each batch over every device (of every process).

conftest.py gives this process 2 fake CPU devices; one test starts a process with 4, another two processes
of 2 devices each joined by jax.distributed. What is checked:
  * the images (and features) are those of one device: bit for bit when each device runs the same per-device
    batch shape as the single device did, and to float rounding otherwise (XLA:CPU may round convolutions
    differently for another batch shape, as it does on one device for another batch size);
  * each device computes only its rows: the output's shards, the keys' shape inside the compiled per-device
    program, no collectives in it, and half (a quarter) of the single-device flops.
The tiny UNet has random N(0, 0.2^2) weights: the real init zeroes the output layer (f would be c_skip x).
"""

import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import edit
from cm_jax import inference
from cm_jax import samplers
from cm_jax.configs import test as test_config
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import sampling
from cm_jax.evaluation import classifier
from cm_jax.evaluation import evaluator
from cm_jax.runtime import sharding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)
NUM_CLASSES = 3
LABELS = np.array([2, 0, 1, 1, 2], np.int32)  # Five samples: not a multiple of 2 or 4 devices.
SEED = 7
COLLECTIVES = ('all-gather', 'all-reduce', 'all-to-all', 'collective-permute', 'reduce-scatter')


@pytest.fixture(autouse=True, scope='module')
def fast_compiles():
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def tiny_model(loss: str = 'ct', channels: int = 1):
  """(config, denoiser, host params) of the one-level test UNet, class-conditional, random weights."""
  config = test_config.get_config(loss)
  config.model.ch_mult = (1,)  # One level: half the compile time.
  config.model.class_conditional, config.model.num_classes = True, NUM_CLASSES
  denoiser = denoiser_lib.make_denoiser(config)
  shapes = jax.eval_shape(lambda: denoiser.model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)), jnp.zeros((1,)), labels_B=jnp.zeros((1,), jnp.int32),
      train=False)['params'])
  rng = np.random.default_rng(channels)
  params = jax.tree.map(lambda s: np.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)
  return config, denoiser, params


def one_device_mesh():
  return sharding.make_mesh(jax.local_devices()[:1])


def samples(fn, params, spec, batch_size, num=5):
  return samplers.sample_in_batches(fn, params, spec, num, SEED, batch_size, SHAPE, LABELS[:num])


def key_rows_per_device(compiled) -> int:
  """Rows of the keys (the only u32[B, 2] parameter) in the compiled per-device program."""
  entry = next(line for line in compiled.as_text().splitlines() if line.startswith('ENTRY'))
  rows = {int(b) for b in re.findall(r'u32\[(\d+),2\]', entry)}
  assert len(rows) == 1, entry[:2000]
  return rows.pop()


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


# --------------------------------------------------------------------------------------------------
# Sampling on this process's 2 devices
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('loss,sampler,steps', [('ct', 'consistency', 1), ('ct', 'consistency', 2),
                                                ('edm', 'heun', 2)])
def test_same_images_on_one_device_and_on_all(loss, sampler, steps):
  config, denoiser, params = tiny_model(loss)
  spec = samplers.make_sampler(config, sampler, steps)
  one = samplers.make_sample_fn(denoiser, one_device_mesh())
  every = samplers.make_sample_fn(denoiser)  # Default: all devices.
  assert one.mesh.size == 1 and every.mesh.size == jax.device_count() == 2
  # Five samples in one batch over 2 devices: padded to 6 (the key of sample 5), 3 rows per device, cut to 5.
  sharded = samples(every, params, spec, batch_size=5)
  assert sharded.shape == (5,) + SHAPE and sharded.dtype == np.float32
  assert np.std(sharded) > 1e-2 and not np.allclose(sharded[0], sharded[1])  # Real, distinct images.
  # One device in batches of 3 runs the per-device program of the sharded run: the same bits.
  np.testing.assert_array_equal(samples(one, params, spec, batch_size=3), sharded)
  # One device, one batch of 5: another shape, so only float rounding may differ. Heun's states reach
  # |x| ~ 80 * 4 and pass through three network calls: an AVX-512 EPYC differed there by 1.5e-4 (a mixed-up
  # sample differs by ~1); consistency sampling stayed within 1e-6.
  atol = 1e-3 if sampler == 'heun' else 1e-6
  np.testing.assert_allclose(samples(one, params, spec, batch_size=5), sharded, rtol=0, atol=atol)
  # Sample i depends only on (seed, i, label i), not on the batch it is in (1 row per device here).
  np.testing.assert_allclose(samples(every, params, spec, batch_size=2, num=3), sharded[:3], rtol=0, atol=atol)


def test_each_device_computes_only_its_rows():
  config, denoiser, params = tiny_model()
  spec = samplers.make_sampler(config, 'consistency', 2)
  keys = sampling.example_keys(jax.random.PRNGKey(SEED), 0, 6)
  labels = np.arange(6, dtype=np.int32) % NUM_CLASSES
  one = samplers.make_sample_fn(denoiser, one_device_mesh())
  every = samplers.make_sample_fn(denoiser)
  x = every(params, keys, spec, (6,) + SHAPE, labels)
  assert shard_rows(x) == [(0, 0, 3), (3, 1, 3)]  # Rows 0-2 on device 0, rows 3-5 on device 1.
  assert all(s.data.shape == (3,) + SHAPE for s in x.addressable_shards)
  # Each device's rows are what one device computes for those 3 keys alone.
  halves = [sharding.to_host(one(params, keys[i:i + 3], spec, (3,) + SHAPE, labels[i:i + 3])) for i in (0, 3)]
  np.testing.assert_array_equal(sharding.to_host(x), np.concatenate(halves))
  sharded = every.lower(params, keys, spec, (6,) + SHAPE, labels).compile()
  single = one.lower(params, keys, spec, (6,) + SHAPE, labels).compile()
  assert key_rows_per_device(single) == 6 and key_rows_per_device(sharded) == 3
  assert not [c for c in COLLECTIVES if c in sharded.as_text()]  # No device waits for another's rows.
  assert 0.45 < flops(sharded) / flops(single) < 0.55, (flops(sharded), flops(single))
  # A batch the devices do not divide: 5 keys are padded to 6 inside run and the result cut back.
  x5 = every(params, keys[:5], spec, (5,) + SHAPE, labels[:5])
  assert x5.shape == (5,) + SHAPE
  np.testing.assert_array_equal(sharding.to_host(x5), sharding.to_host(x)[:5])
  with pytest.raises(ValueError, match='5 keys for a batch of shape'):
    every(params, keys[:5], spec, (6,) + SHAPE, labels[:5])


def test_padding_helpers():
  mesh = sharding.make_mesh()
  assert [sharding.padded_batch_size(b, mesh) for b in (1, 2, 3, 4, 5)] == [2, 2, 4, 4, 6]
  np.testing.assert_array_equal(sharding.pad_rows(np.arange(3), 5), [0, 1, 2, 2, 2])
  x = sharding.shard_batch(np.arange(8.0).reshape(4, 2), mesh)
  assert [s.data.shape for s in x.addressable_shards] == [(2, 2), (2, 2)]
  np.testing.assert_array_equal(sharding.to_host(x), np.arange(8.0).reshape(4, 2))
  with pytest.raises(ValueError, match='pad it first'):
    sharding.shard_batch(np.zeros((3, 2)), mesh)
  # What every process does in a multi-process run, here on one: build the array from its slices.
  global_array = sharding._global_array  # pylint: disable=protected-access
  built = global_array(np.arange(8.0).reshape(4, 2), sharding.batch_sharding(mesh))
  assert built.sharding == x.sharding and np.array_equal(sharding.to_host(built), sharding.to_host(x))
  np.testing.assert_array_equal(sharding.split_over_processes(lambda a: a * 2, np.arange(3)), [0, 2, 4])


# --------------------------------------------------------------------------------------------------
# Editing and evaluation features
# --------------------------------------------------------------------------------------------------
def test_editing_splits_its_batch_and_keeps_the_images(monkeypatch):
  config, denoiser, params = tiny_model(channels=3)
  config.data.name, config.data.image_size = 'image_folder', 8  # 8x8 RGB: the model's image shape.
  model = inference.LoadedModel(config=config, params=params, step=0, which_params='online')
  assert model.image_shape == (8, 8, 3)
  clean = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  gathered = []
  to_host = sharding.to_host
  monkeypatch.setattr(sharding, 'to_host', lambda x: gathered.append([s.data.shape[0] for s in x.addressable_shards])
                      or to_host(x))
  kwargs = dict(ts=(80.0, 2.0), num=3, class_label=1)
  sharded = edit.run_task(model, 'inpaint', clean, batch_size=3, **kwargs)['result']
  assert gathered == [[2, 2]]  # Three images padded to 4: 2 rows on each device.
  # One device, batches of 2: the per-device program of the run above, so the same bits.
  every_device = sharding.make_mesh
  monkeypatch.setattr(sharding, 'make_mesh', lambda devices=None: every_device(jax.devices()[:1]))
  alone = edit.run_task(model, 'inpaint', clean, batch_size=2, **kwargs)['result']
  assert gathered[1:] == [[2], [2]]
  np.testing.assert_array_equal(alone, sharded)
  assert not np.array_equal(sharded[0], sharded[1])


def random_classifier():
  params = classifier.SmallCNN(10).init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)))['params']
  info = {'dataset': 'mnist', 'pad_to': 0, 'test_accuracy': 0.0, 'train_steps': 0, 'seed': 0,
          'cache_file': '', 'cache_key': 'random'}
  return classifier.Classifier(params, 10, (28, 28, 1), info)


def test_features_on_all_devices_equal_those_on_one(monkeypatch):
  net = random_classifier()
  images = np.random.default_rng(2).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  gathered = []
  to_host = sharding.to_host
  monkeypatch.setattr(sharding, 'to_host', lambda x: gathered.append([s.data.shape[0] for s in x.addressable_shards])
                      or to_host(x))
  one_f, one_p = net(images, batch_size=5, devices=jax.devices()[:1])
  assert gathered == [[5], [5]]  # Features and probabilities of one batch of 5 on one device.
  # The evaluator's feature net splits each batch over every device: 5 images -> 6 rows, 3 per device.
  monkeypatch.setattr(classifier, 'load_or_train', lambda config: net)
  config = test_config.get_config()
  config.data.name, config.evaluation.batch_size = 'mnist', 5
  feature_net = evaluator.make_feature_net(config)
  features, probs = feature_net.fn(images)
  assert gathered[2:] == [[3, 3], [3, 3]]
  assert features.shape == (5, classifier.FEATURE_DIM) and features.dtype == np.float64
  assert np.std(features) > 1e-3 and not np.allclose(features[0], features[1])
  np.testing.assert_allclose(features, one_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs, one_p, rtol=1e-5, atol=1e-7)
  # The same per-device batch (3) on one device gives the same bits.
  three = [net(images[i:i + 3], batch_size=3, devices=jax.devices()[:1])[0] for i in (0, 3)]
  np.testing.assert_array_equal(features, np.concatenate(three))
  local_features, _ = feature_net.local_fn(images)  # One process: its devices are all devices.
  np.testing.assert_array_equal(local_features, features)


# --------------------------------------------------------------------------------------------------
# 4 devices in a fresh process; 2 processes of 2 devices
# --------------------------------------------------------------------------------------------------
def child_env(devices: int) -> dict:
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  return dict(os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
              JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)


def child_code(call: str, prelude: str = '') -> str:
  """Python for `python -c`: prelude (before anything touches a device), then this module's `call`."""
  return (f'import sys\n{prelude}\nsys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})\n'
          f'import jax\njax.config.update("jax_disable_most_optimizations", True)\n'
          f'import test_sharded_sampling as t\nt.{call}\n')


def shard_rows(x) -> list:
  """(first row, position of the device in jax.devices(), rows) of each shard this process holds."""
  position = {d: k for k, d in enumerate(jax.devices())}
  return sorted((int(s.index[0].start or 0), position[s.device], int(s.data.shape[0])) for s in x.addressable_shards)


def child_four_devices(out: str) -> None:
  """In a process with 4 devices: 5 two-step samples on all 4 (one batch of 8, 2 rows each) and on one."""
  assert jax.device_count() == 4
  config, denoiser, params = tiny_model()
  spec = samplers.make_sampler(config, 'consistency', 2)
  every = samplers.make_sample_fn(denoiser)
  one = samplers.make_sample_fn(denoiser, one_device_mesh())
  keys = sampling.example_keys(jax.random.PRNGKey(SEED), 0, 8)
  labels = np.resize(LABELS, 8)
  x = every(params, keys, spec, (8,) + SHAPE, labels)
  sharded = every.lower(params, keys, spec, (8,) + SHAPE, labels).compile()
  single = one.lower(params, keys, spec, (8,) + SHAPE, labels).compile()
  np.savez(out, sharded=samples(every, params, spec, batch_size=5),
           one_2=samples(one, params, spec, batch_size=2), one_5=samples(one, params, spec, batch_size=5),
           shards=np.asarray(shard_rows(x)), key_rows=[key_rows_per_device(single), key_rows_per_device(sharded)],
           flops=[flops(single), flops(sharded)],
           collectives=[c for c in COLLECTIVES if c in sharded.as_text()] or ['none'])


def test_four_devices_in_a_fresh_process(tmp_path):
  out = str(tmp_path / 'four.npz')
  result = subprocess.run([sys.executable, '-c', child_code(f'child_four_devices({out!r})')], cwd=REPO_ROOT,
                          env=child_env(4), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  r = np.load(out)
  assert r['shards'].tolist() == [[0, 0, 2], [2, 1, 2], [4, 2, 2], [6, 3, 2]]  # Device k: rows 2k, 2k + 1.
  assert r['key_rows'].tolist() == [8, 2]
  assert r['collectives'].tolist() == ['none']
  assert 0.2 < r['flops'][1] / r['flops'][0] < 0.3
  assert r['sharded'].shape == (5,) + SHAPE and not np.allclose(r['sharded'][0], r['sharded'][1])
  np.testing.assert_array_equal(r['one_2'], r['sharded'])  # The same per-device batch (2): the same bits.
  np.testing.assert_allclose(r['one_5'], r['sharded'], rtol=0, atol=1e-6)


def child_two_processes(out: str) -> None:
  """Process jax.process_index() of 2 (2 devices each): sampling, features and a host function split over
  all 4 devices, and the same on this process's first device alone."""
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  config, denoiser, params = tiny_model()
  spec = samplers.make_sampler(config, 'consistency', 2)
  every = samplers.make_sample_fn(denoiser)
  one = samplers.make_sample_fn(denoiser, one_device_mesh())
  keys = sampling.example_keys(jax.random.PRNGKey(SEED), 0, 8)
  x = every(params, keys, spec, (8,) + SHAPE, np.resize(LABELS, 8))
  net = random_classifier()
  images = np.random.default_rng(2).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  host_fn = lambda a: (a * 2.0, a.sum(axis=1))
  rows = np.arange(10.0).reshape(5, 2)
  # The evaluator's feature net: fn over both processes' devices, local_fn (reference features) on this one's.
  classifier.load_or_train = lambda config: net
  config.data.name, config.evaluation.batch_size = 'mnist', 5
  feature_net = evaluator.make_feature_net(config)
  spans, to_host = [], sharding.to_host
  sharding.to_host = lambda a: spans.append(0 if a.is_fully_addressable else 1) or to_host(a)
  fn_features, local_features = feature_net.fn(images)[0], feature_net.local_fn(images)[0]
  sharding.to_host = to_host
  np.savez(out, sharded=samples(every, params, spec, batch_size=5), one=samples(one, params, spec, batch_size=2),
           shards=np.asarray(shard_rows(x)), features=net(images, batch_size=5, devices=jax.devices())[0],
           features_one=net(images, batch_size=2, devices=jax.local_devices()[:1])[0],
           fn_features=fn_features, local_features=local_features, spans_processes=spans,
           split=np.concatenate(sharding.split_over_processes(host_fn, rows), axis=None),
           split_one=np.concatenate(host_fn(rows), axis=None))


def test_two_processes_of_two_devices(tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  children = []
  for i in range(2):
    prelude = ('import jax\njax.config.update("jax_cpu_collectives_implementation", "gloo")\n'
               f'jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={i})')
    out = str(tmp_path / f'process{i}.npz')
    children.append(subprocess.Popen([sys.executable, '-c', child_code(f'child_two_processes({out!r})', prelude)],
                                     cwd=REPO_ROOT, env=child_env(2), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
  try:
    for child in children:
      _, stderr = child.communicate(timeout=300)
      assert child.returncode == 0, stderr[-3000:]
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
  r0, r1 = (np.load(tmp_path / f'process{i}.npz') for i in range(2))
  # Each process holds its own two devices' rows of the batch of 8: process 0 rows 0-3, process 1 rows 4-7.
  assert r0['shards'].tolist() == [[0, 0, 2], [2, 1, 2]] and r1['shards'].tolist() == [[4, 2, 2], [6, 3, 2]]
  for r in (r0, r1):  # Every process ends with all samples and features.
    assert r['sharded'].shape == (5,) + SHAPE and not np.allclose(r['sharded'][0], r['sharded'][1])
    np.testing.assert_array_equal(r['one'], r['sharded'])  # 2 rows per device as on one device: the same bits.
    assert r['features'].shape == (5, classifier.FEATURE_DIM)
    np.testing.assert_allclose(r['features'], r['features_one'], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r['split'], r['split_one'])
    assert r['spans_processes'].tolist() == [1, 1, 0, 0]  # fn's features and probabilities, then local_fn's.
    np.testing.assert_array_equal(r['fn_features'], r['features'])
    np.testing.assert_allclose(r['local_features'], r['features'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(r0['sharded'], r1['sharded'])
  np.testing.assert_array_equal(r0['features'], r1['features'])
