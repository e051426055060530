"""Checkpoint integrity: every saved array carries a checksum that each restore verifies, so bytes damaged on disk
are never loaded. Training moves such a checkpoint aside and resumes from an older one; inference.load (the
sample/evaluate/edit CLIs) and the teacher fall back to the newest intact step, or refuse an explicit damaged one.
"""

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore

from cm_jax import checkpointing
from cm_jax import inference
from cm_jax import teacher
from cm_jax import train
from cm_jax import train_state as ts
from cm_jax.configs import test as test_config
from cm_jax.runtime import sharding
import tiny_runs

# When one chunk of a damaged checkpoint fails to read, Orbax abandons the reads of the others, which Python then
# reports as never-awaited coroutines: noise from the damage these tests make on purpose.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


# --------------------------------------------------------------------------------------------------
# The checksum function.
# --------------------------------------------------------------------------------------------------
def checksum(x) -> str:
  return checkpointing.checksums({'x': x})['x']


def flip_bit(x: np.ndarray, index: int, bit: int) -> np.ndarray:
  words = x.copy().view(np.uint32)
  words[index] ^= np.uint32(1 << bit)
  return words.view(np.float32)


RANDOM = np.random.default_rng(0).standard_normal(1000).astype(np.float32)


def test_equal_arrays_have_equal_checksums_named_by_leaf_path():
  tree = {'params': {'Conv_0': {'kernel': RANDOM.reshape(10, 100)}}, 'ema_params': (RANDOM[:7], RANDOM[7:])}
  sums = checkpointing.checksums(tree)
  assert sorted(sums) == ['ema_params/0', 'ema_params/1', 'params/Conv_0/kernel']
  assert sums['params/Conv_0/kernel'].startswith('float32:') and len(sums['params/Conv_0/kernel']) == 8 + 16
  assert sums == checkpointing.checksums(jax.tree.map(np.copy, tree))
  assert checksum(RANDOM) == checksum(jnp.asarray(RANDOM))
  assert checksum(RANDOM) != checksum(RANDOM[:999]) and checksum(RANDOM) != checksum(-RANDOM)


@pytest.mark.parametrize('index', [0, 517, 999])
def test_every_single_bit_flip_changes_the_checksum(index):
  """All 32 bits of a float32, the sign (31) and exponent (23..30) included; each term is a bijection of its word."""
  base = checksum(RANDOM)
  flipped = {bit: checksum(flip_bit(RANDOM, index, bit)) for bit in range(32)}
  assert base not in flipped.values(), [bit for bit, s in flipped.items() if s == base]
  assert len(set(flipped.values())) == 32  # And no two flips collide.


@pytest.mark.parametrize('i, j', [(0, 1), (0, 999), (10, 500), (998, 999), (256, 768)])
def test_swapping_two_elements_changes_the_checksum(i, j):
  swapped = RANDOM.copy()
  swapped[[i, j]] = swapped[[j, i]]
  assert checksum(swapped) != checksum(RANDOM)
  rows = RANDOM.reshape(10, 100)
  assert checksum(rows[::-1]) != checksum(rows) and checksum(rows.T.copy()) != checksum(rows.T[::-1].copy())


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'int32', 'uint32', 'int8', 'uint8', 'bool'])
def test_one_changed_element_of_any_dtype_changes_the_checksum(dtype):
  x = jnp.asarray(RANDOM[:64] > 0 if dtype == 'bool' else RANDOM[:64] * 50).astype(dtype)
  changed = x.at[33].set(~x[33] if dtype == 'bool' else x[33] + 1)
  assert checksum(x) == checksum(jnp.array(x)) and checksum(x).startswith(f'{dtype}:')
  assert checksum(changed) != checksum(x)


def test_prng_keys_typed_or_raw_have_checksums():
  typed = jax.random.split(jax.random.key(0), 3)
  assert checksum(typed) == checksum(jax.random.split(jax.random.key(0), 3))
  assert checksum(typed) != checksum(jax.random.split(jax.random.key(1), 3))
  assert checksum(jax.random.PRNGKey(0)) != checksum(jax.random.PRNGKey(1))
  assert checksum(jnp.zeros((0,), jnp.float32)) == 'float32:' + '0' * 16  # Empty arrays are fine too.


def test_a_sharded_array_has_the_checksum_of_the_unsharded_one():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 2
  x = RANDOM[:960].reshape(8, 120)
  for spec in (P('data'), P(None, 'data'), P()):
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    assert checksum(placed) == checksum(x), spec
  tree = {'a': jax.device_put(x, NamedSharding(mesh, P('data'))), 'b': RANDOM[:5]}
  assert checkpointing.checksums(tree) == checkpointing.checksums({'a': x, 'b': RANDOM[:5]})


def test_checksums_of_many_sharded_leaves_finish(tmp_path):
  """A state of 200 sharded arrays on 2 CPU devices of one process: all their checksum programs queued at once
  deadlocked XLA:CPU's all-reduces, which aborted the process after 40 s (checkpointing._CHECKSUMS_IN_FLIGHT).
  Run in a child process so that a regression fails this test instead of killing the test session."""
  script = tmp_path / 'many_leaves.py'
  script.write_text(textwrap.dedent('''\
      import jax, jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      from cm_jax import checkpointing
      from cm_jax.runtime import sharding
      mesh = sharding.make_mesh()
      assert mesh.devices.size == 2
      tree = {f'a{i}': jax.device_put(jnp.full((2 * (i % 7 + 1), 8), float(i)), NamedSharding(mesh, P('data')))
              for i in range(200)}
      for _ in range(3):
        sums = checkpointing.checksums(tree)
      print('checksums', len(sums))
      '''))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', PYTHONPATH=root)
  result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and 'checksums 200' in result.stdout, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# The one loop that finds the newest readable checkpoint, on a fake manager.
# --------------------------------------------------------------------------------------------------
class FakeManager:
  """The part of a CheckpointManager the restores use, over empty folders CHECKPOINTS/1..3 whose step 3 fails to
  read; every step holds the state {'w': [step, step]}, `config` and the data record {'n': 1}."""

  def __init__(self, directory: str, config):
    self.directory, self.config = directory, config
    for step in (1, 2, 3):
      os.makedirs(os.path.join(directory, str(step)))

  def all_steps(self) -> list:
    return [int(name) for name in os.listdir(self.directory)]

  def restore(self, step: int, args=None):
    del args  # Every item at once.
    if step == 3:
      raise ValueError('OUT_OF_RANGE: Error reading "params.Conv_0.kernel/0.0" (test)')
    return types.SimpleNamespace(state={'w': np.full(2, step, np.float32)}, config=self.config.to_dict(),
                                 data={'n': 1})

  def reload(self) -> None:
    pass


def test_a_step_that_fails_to_read_is_skipped_by_read_only_restores_and_moved_aside_by_resume(tmp_path, caplog):
  config = tiny_config()
  workdir = str(tmp_path / 'run')
  checkpoints = checkpointing.checkpoint_dir(workdir)
  manager = FakeManager(checkpoints, config)
  with caplog.at_level(logging.WARNING):
    step, state = checkpointing.restore_read_only(manager, lambda s: manager.restore(s).state)
  assert step == 2 and state['w'].tolist() == [2, 2]
  assert any('unreadable or corrupt' in m and 'its files are left as they are' in m and 'OUT_OF_RANGE' in m
             for m in warnings_about(caplog, 3)), caplog.text
  assert 'Using step 2, the newest readable checkpoint' in caplog.text
  assert checkpointing.saved_data(manager) == {'n': 1}
  assert checkpointing.saved_config(manager).data.name == config.data.name
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']  # Read-only: nothing moved.

  with pytest.raises(ValueError, match='different training array'):  # A mismatch is raised, not skipped.
    checkpointing.restore_for_resume(manager, None, config, {'n': 2}, workdir)
  assert sorted(os.listdir(checkpoints)) == ['1', '2', '3']
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state = checkpointing.restore_for_resume(manager, None, config, {'n': 1}, workdir)
  assert state['w'].tolist() == [2, 2]
  assert any('unreadable or corrupt' in m and 'trying an older one.' in m for m in warnings_about(caplog, 3))
  assert 'Moved the unreadable checkpoint of step 3' in caplog.text
  assert sorted(os.listdir(checkpoints)) == ['1', '2']
  assert [n.split('-')[0] for n in os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))] == ['3']


class RotatingManager(FakeManager):
  """A trainer with keep_checkpoints=1 beside the reader: reading step N finds it deleted and step N + 1
  written meanwhile, for steps below `until`."""

  def __init__(self, directory: str, config, until: int):
    super().__init__(directory, config)
    self.until, self.reloads = until, 0
    for step in (1, 2):
      os.rmdir(os.path.join(directory, str(step)))

  def restore(self, step: int, args=None):
    if step < self.until:
      os.makedirs(os.path.join(self.directory, str(step + 1)))
      os.rmdir(os.path.join(self.directory, str(step)))
      raise FileNotFoundError(f'{self.directory}/{step}/state: no such file (test)')
    return types.SimpleNamespace(state={'w': np.full(2, step, np.float32)})

  def reload(self) -> None:
    self.reloads += 1


def test_a_read_only_restore_follows_a_rotating_trainer_instead_of_reporting_damage(tmp_path, caplog):
  manager = RotatingManager(str(tmp_path / 'checkpoints'), tiny_config(), until=6)
  with caplog.at_level(logging.INFO):
    step, state = checkpointing.restore_read_only(manager, lambda s: manager.restore(s).state)
  assert step == 6 and state['w'].tolist() == [6, 6] and manager.reloads == 3
  assert 'removed while being read' in caplog.text and 'unreadable or corrupt' not in caplog.text
  endless = RotatingManager(str(tmp_path / 'endless'), tiny_config(), until=10 ** 6)
  with pytest.raises(checkpointing.UnreadableCheckpointError, match='deleted each checkpoint while it was being read'):
    checkpointing.restore_read_only(endless, lambda s: endless.restore(s).state)  # Gives up after a few tries.


def test_newest_readable_propagates_errors_that_are_not_damage():
  def read(step):
    if step == 3:
      raise TypeError('a bug (test)')
    return step

  with pytest.raises(TypeError, match='a bug'):
    checkpointing.newest_readable([1, 2, 3], read, on_bad=lambda step, e: pytest.fail('skipped a bug'))
  bad = []
  found = checkpointing.newest_readable([3, 1, 2], read, lambda step, e: bad.append(step), is_bad=lambda e: True)
  assert found == (2, 2) and bad == [3]
  assert checkpointing.newest_readable([], read, lambda step, e: bad.append(step)) is None


# --------------------------------------------------------------------------------------------------
# A tiny trained run (checkpoints at steps 2 and 4), and ways to damage its newest checkpoint.
# --------------------------------------------------------------------------------------------------
def tiny_config():
  return tiny_runs.tiny_config(local_data=True)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, config, final state, step-2 state) of 4 straight steps."""
  workdir = str(tmp_path_factory.mktemp('integrity') / 'run')
  config = tiny_config()
  state = train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return workdir, config, state, full_restore(workdir, 2)


def abstract_state(config, sharding_=None):
  sharding_ = sharding_ or sharding.replicated(sharding.make_mesh())
  abstract = jax.eval_shape(functools.partial(ts.init_state, config, ts.make_optimizer(config)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), abstract)


def full_restore(workdir, step):
  """The whole train state of a checkpoint as it reads from disk, without any checksum check."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    abstract = abstract_state(checkpointing.restore_config(manager, step))
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
  finally:
    manager.close()


def tree_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def snapshot(root) -> dict:
  """{relative path: md5} of every file under root."""
  return {os.path.relpath(os.path.join(folder, name), root):
          hashlib.md5(open(os.path.join(folder, name), 'rb').read()).hexdigest()
          for folder, _, names in os.walk(root) for name in names}


def chunk_locations(state_dir: str) -> dict:
  """{zarr chunk key: (data file, offset, length)} of the array chunks stored outside the OCDBT tree, read with
  TensorStore's own dump of the database (Orbax packs many arrays into each data file, in no fixed order)."""
  base = tensorstore.KvStore.open(f'file://{state_dir}/').result()
  version = tensorstore.ocdbt.dump(base).result()['versions'][-1]
  assert version['root_height'] == 0, 'a tiny run has a one-node B+tree; this helper reads no deeper'
  out = {}
  for entry in tensorstore.ocdbt.dump(base, version['root']['location']).result()['entries']:
    if 'indirect_value' in entry:  # 'value:ocdbt.process_0/:d/FILE:OFFSET:LENGTH'
      where, offset, length = entry['indirect_value'].rsplit(':', 2)
      prefix, name = where[len('value:'):].split(':', 1)
      out[entry['key'].decode()] = (os.path.join(state_dir, prefix + name), int(offset), int(length))
  return out


def damage(path: str, offset: int, how: str) -> None:
  """Inverts the 64 bytes centred on `offset` ('flip'), or cuts the file there ('truncate')."""
  if how == 'truncate':
    os.truncate(path, offset)
    return
  with open(path, 'r+b') as f:
    f.seek(offset - 32)
    data = f.read(64)
    f.seek(offset - 32)
    f.write(bytes(b ^ 0xFF for b in data))


def damaged_copy(run, tmp_path, how: str, where: str) -> str:
  """A copy of the run whose step-4 checkpoint is damaged in the middle of the largest chunk of the first EMA
  (where='ema'), which every restore reads, or in the middle of the largest array data file ('largest_file',
  the recipe of the bug report, which may hit any array, or bytes no array uses)."""
  workdir = str(tmp_path / f'{how}_{where}')
  shutil.copytree(run[0], workdir)
  state_dir = os.path.join(workdir, 'checkpoints', '4', 'state')
  if where == 'ema':
    chunks = {k: v for k, v in chunk_locations(state_dir).items() if k.startswith('ema_params.0.')}
    path, offset, length = max(chunks.values(), key=lambda v: v[2])
    assert length > 512, chunks
    damage(path, offset + length // 2, how)
  else:
    files = [os.path.join(folder, name) for folder, _, names in os.walk(state_dir) for name in names
             if os.path.basename(folder) == 'd']
    path = max(files, key=os.path.getsize)
    damage(path, os.path.getsize(path) // 2, how)
  return workdir


def warnings_about(caplog, step: int) -> list:
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and re.search(rf'\bstep {step}\b', r.getMessage())]


# --------------------------------------------------------------------------------------------------
# Saving and verifying.
# --------------------------------------------------------------------------------------------------
def test_every_checkpoint_carries_the_checksum_of_every_array(run):
  workdir, _, state, _ = run
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    saved = checkpointing.saved_checksums(manager, 4)
  finally:
    manager.close()
  arrays = {k: v for k, v in saved.items() if not k.startswith('#')}
  assert arrays == checkpointing.checksums(state)
  assert len(arrays) == len(jax.tree.leaves(state)) and 'opt_state/1/0/mu/Conv_0/kernel' in saved
  assert sorted(set(saved) - set(arrays)) == ['#config', '#data']  # And of the JSON items beside the state.
  with open(os.path.join(workdir, 'checkpoints', '4', 'config', 'metadata')) as f:
    assert saved['#config'] == checkpointing.json_checksum(json.load(f))


def test_json_checksum_of_a_value_and_of_its_json_round_trip_agree():
  config = tiny_config().to_dict()
  assert checkpointing.json_checksum(config) == checkpointing.json_checksum(json.loads(json.dumps(config)))
  assert checkpointing.json_checksum({'a': (1, 2.5), 'b': None}) == checkpointing.json_checksum({'b': None,
                                                                                                'a': [1, 2.5]})
  assert checkpointing.json_checksum({'x': 0.71}) != checkpointing.json_checksum({'x': 0.72})


def test_partial_restore_verifies_exactly_the_arrays_it_reads(run, tmp_path):
  """A wrong checksum of an optimizer array fails the full restore but not inference.load, which reads only
  params and EMAs; a wrong checksum of an EMA fails both, naming the array."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(run[0], workdir)
  record = os.path.join(workdir, 'checkpoints', '4', 'checksums', 'metadata')
  original = json.loads(open(record).read())

  def write_record(wrong: str) -> None:
    changed = dict(original, **{wrong: original[wrong][:-1] + ('0' if original[wrong][-1] != '0' else '1')})
    with open(record, 'w') as f:
      json.dump(changed, f)

  write_record('opt_state/1/0/mu/Conv_0/kernel')
  assert inference.load(workdir, step=4).step == 4
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r'step 4 .* corrupt \(1 of its \d+ arrays .*: '
                       r'opt_state/1/0/mu/Conv_0/kernel\); it was not loaded'):
      checkpointing.verify(manager, 4, full_restore(workdir, 4))
  finally:
    manager.close()
  write_record('ema_params/1/Conv_0/kernel')
  with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'step 4 .*ema_params/1/Conv_0/kernel'):
    inference.load(workdir, step=4, ema='online')  # Only the first EMA is returned; both are verified.


# --------------------------------------------------------------------------------------------------
# Training: a damaged checkpoint is moved aside, never loaded, and no older one is touched.
# --------------------------------------------------------------------------------------------------
def test_resume_skips_flipped_bytes_and_ends_bit_identical(run, tmp_path, caplog):
  """64 bytes inverted inside the first EMA of step 4: the restart warns, moves step 4 aside, keeps step 2 as
  it was, resumes from it and trains steps 3 and 4 again to the uninterrupted run's state, bit for bit."""
  _, config, straight_state, _ = run
  workdir = damaged_copy(run, tmp_path, 'flip', 'ema')
  damaged = full_restore(workdir, 4)  # Reads without an error (the bug): only the checksums can tell.
  assert not tree_equal(damaged.ema_params[0], straight_state.ema_params[0])
  step2 = snapshot(os.path.join(workdir, 'checkpoints', '2'))
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(config, workdir)
  assert any('unreadable or corrupt' in m for m in warnings_about(caplog, 4)), caplog.text
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('4-'), aside
  assert snapshot(os.path.join(workdir, 'checkpoints', '2')) == step2
  assert int(state.step) == 4 and tree_equal(state, straight_state)
  assert tree_equal(full_restore(workdir, 4), straight_state)  # Step 4 saved again, intact.


@pytest.mark.parametrize('how', ['flip', 'truncate'])
def test_restore_for_resume_never_returns_damaged_arrays(run, tmp_path, how):
  """Damage in the middle of the largest data file (which arrays it hits depends on Orbax's layout): the resume
  gets either the intact step 4 (the bytes were not part of any array) or step 2 with step 4 moved aside."""
  _, config, straight_state, step2_state = run
  workdir = damaged_copy(run, tmp_path, how, 'largest_file')
  manager = checkpointing.make_manager(workdir, config)
  try:
    data = checkpointing.saved_data(manager)
    state = checkpointing.restore_for_resume(manager, abstract_state(config), config, data, workdir)
  finally:
    manager.close()
  moved = os.path.isdir(os.path.join(workdir, 'unreadable_checkpoints'))
  if int(state.step) == 4:
    assert not moved and tree_equal(state, straight_state)
  else:
    assert moved and int(state.step) == 2 and tree_equal(state, step2_state)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == (['2', '4'] if not moved else ['2'])


# --------------------------------------------------------------------------------------------------
# The read-only readers: inference.load (sample, evaluate, edit) and the teacher of distillation.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('how', ['flip', 'truncate'])
def test_inference_load_falls_back_to_the_newest_intact_step_and_refuses_the_damaged_one(run, tmp_path, caplog,
                                                                                         how):
  _, _, _, step2_state = run
  workdir = damaged_copy(run, tmp_path, how, 'ema')
  before = snapshot(workdir)
  with caplog.at_level(logging.WARNING):
    model = inference.load(workdir)
  assert model.step == 2 and tree_equal(model.params, step2_state.ema_params[0])
  assert warnings_about(caplog, 4), caplog.text
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r'checkpoint of step 4 in .* is unreadable or corrupt .* Other steps there: \[2\]'):
    inference.load(workdir, step=4)
  assert inference.load(workdir, step=2).step == 2
  with pytest.raises(FileNotFoundError, match=r'No checkpoint for step 3 .*available steps: \[2, 4\]'):
    inference.load(workdir, step=3)
  assert snapshot(workdir) == before, 'a read-only load changed the workdir'


def test_inference_load_with_every_step_damaged_names_them_all(run, tmp_path):
  workdir = damaged_copy(run, tmp_path, 'flip', 'ema')
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '2', 'state'))
  with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'No readable checkpoint .*step 4: .*step 2: '):
    inference.load(workdir)


def test_teacher_refuses_a_damaged_step(run, tmp_path):
  workdir = damaged_copy(run, tmp_path, 'flip', 'ema')
  config = test_config.get_config('cd')
  config.teacher.workdir, config.teacher.step = workdir, 4
  with pytest.raises(checkpointing.UnreadableCheckpointError,
                     match=r'config\.teacher \(workdir .*, step 4\): .*step 4 .*Other steps there: \[2\]'):
    teacher.load_teacher(config)


# --------------------------------------------------------------------------------------------------
# The config and data record are covered too, and a missing checksums item is damage when others have theirs.
# --------------------------------------------------------------------------------------------------
def edit_json_item(workdir: str, step: int, item: str, edit) -> None:
  path = os.path.join(workdir, 'checkpoints', str(step), item, 'metadata')
  with open(path) as f:
    value = json.load(f)
  edit(value)
  with open(path, 'w') as f:
    json.dump(value, f)


@pytest.mark.parametrize('damage_kind', ['config_byte', 'data_record', 'checksums_missing'])
def test_a_damaged_config_or_missing_checksums_is_never_loaded(run, tmp_path, caplog, damage_kind):
  """One changed value in step 4's saved config (sigma_data, which changes every sample) or data record, or its
  checksums folder deleted while step 2 keeps its own: the read-only load falls back to step 2 with a warning
  and refuses an explicit step 4 (the config and checksums cases: sampling reads no data record); the resume moves step 4 aside and trains it again, bit-identical."""
  _, config, straight_state, step2_state = run
  workdir = str(tmp_path / damage_kind)
  shutil.copytree(run[0], workdir)
  if damage_kind == 'config_byte':
    edit_json_item(workdir, 4, 'config', lambda c: c['consistency'].update(sigma_data=0.6))
    reason = r'its saved config reads back with another checksum'
  elif damage_kind == 'data_record':
    edit_json_item(workdir, 4, 'data', lambda d: d.update({k: 'x' for k in list(d)[:1]}))
    reason = r'its saved data reads back with another checksum'
  else:
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '4', checkpointing.CHECKSUMS_ITEM))
    reason = r'its checksums item is missing, while the checkpoints of steps \[2\] carry theirs'
  if damage_kind != 'data_record':  # Sampling reads no data record.
    with caplog.at_level(logging.WARNING):
      model = inference.load(workdir)
    assert model.step == 2 and tree_equal(model.params, step2_state.ema_params[0])
    assert any(re.search(reason, m) for m in warnings_about(caplog, 4)), caplog.text
    with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'step 4 .*corrupt .*' + reason):
      inference.load(workdir, step=4)
    caplog.clear()
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(config, workdir)
  assert any(re.search(reason, m) for m in warnings_about(caplog, 4)), caplog.text
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('4-'), aside
  assert int(state.step) == 4 and tree_equal(state, straight_state)


# --------------------------------------------------------------------------------------------------
# Checkpoints written before checksums existed.
# --------------------------------------------------------------------------------------------------
def test_a_run_written_before_checksums_still_restores(run, tmp_path, caplog):
  """Both steps rewritten the way cm_jax saved before checksums (items state, config and data only)."""
  source, config, straight_state, step2_state = run
  workdir = str(tmp_path / 'old')
  shutil.copytree(source, workdir)
  data = None
  for step, state in ((2, step2_state), (4, straight_state)):
    if data is None:
      manager = checkpointing.make_manager(workdir, read_only=True)
      data = checkpointing.saved_data(manager)
      manager.close()
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
    old = ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir), item_names=('state', 'config', 'data'))
    old.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           config=ocp.args.JsonSave(config.to_dict()), data=ocp.args.JsonSave(data)))
    old.wait_until_finished()
    old.close()
    assert not os.path.exists(os.path.join(workdir, 'checkpoints', str(step), checkpointing.CHECKSUMS_ITEM))
  with caplog.at_level(logging.INFO):
    model = inference.load(workdir)
  assert model.step == 4 and tree_equal(model.params, straight_state.ema_params[0])
  assert 'carry no checksums' in caplog.text
  manager = checkpointing.make_manager(workdir, config)
  try:
    state = checkpointing.restore_for_resume(manager, abstract_state(config), config, data, workdir)
  finally:
    manager.close()
  assert tree_equal(state, straight_state)
  assert not os.path.exists(os.path.join(workdir, 'unreadable_checkpoints'))
