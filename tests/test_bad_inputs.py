"""The bad-input corpus: each case runs a real CLI (or the notebook API) on one bad input and checks that it
ends with one line on stderr naming the field, flag or file, with the documented exit code (2: usage, 1:
failure), no traceback, and the workdir unchanged.

The CLI cases run as subprocesses, two at a time (a module fixture), against one tiny trained workdir.
"""

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from typing import Optional

import jax
import numpy as np
from PIL import Image
import pytest

from cm_jax import inference
from cm_jax import samplers
from cm_jax import train
from cm_jax.configs import test as test_config
from cm_jax.runtime import errors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = '/usr/share/datasets/fashion-mnist'


@dataclasses.dataclass
class Case:
  name: str
  module: str               # cm_jax.train / sample / edit / evaluate.
  args: list                # '{run}', '{tmp}', '{new}' are filled in.
  code: int                 # Expected exit code.
  names: tuple              # Substrings the error line must contain (the field, flag or file).
  # The error line must come from cm_jax's checks: no Python exception type names in it.
  file_size_limit: Optional[int] = None  # Run where no file can grow past this many bytes (writes: EFBIG).
  unchanged: tuple = ()     # Files under {tmp} that exist before the run and must be byte-identical after it.


def _cases():
  t = ['--config=configs/test.py', '--workdir={new}']
  run = '--workdir={run}'
  return [
      # ----- training: config files and values (usage errors, exit 2)
      Case('config_missing_file', 'train', ['--config={tmp}/nope.py', '--workdir={new}'], 2, ('--config', 'nope.py')),
      Case('config_returns_dict', 'train', ['--config={tmp}/dict_config.py', '--workdir={new}'], 2,
           ('dict_config.py', 'ConfigDict')),
      Case('config_syntax_error', 'train', ['--config={tmp}/syntax_config.py', '--workdir={new}'], 2,
           ('syntax_config.py', 'line 1')),
      Case('config_raises', 'train', ['--config={tmp}/raising_config.py', '--workdir={new}'], 2,
           ('raising_config.py', 'boom')),
      Case('config_without_get_config', 'train', ['--config={tmp}/no_get_config.py', '--workdir={new}'], 2,
           ('no_get_config.py', 'get_config')),
      Case('config_lacks_fields', 'train', ['--config={tmp}/partial_config.py', '--workdir={new}'], 2,
           ('partial_config.py', 'lacks')),
      Case('override_unknown_key', 'train', t + ['--config.optim.learning_rate=1e-3'], 2,
           ('optim.learning_rate', 'lr')),
      Case('override_misspelt_key', 'train', t + ['--config.optim.lrr=1e-3'], 2, ('optim.lrr', 'optim.lr')),
      Case('override_unknown_section', 'train', t + ['--config.fooo.bar=1'], 2, ('fooo.bar',)),
      Case('override_wrong_type', 'train', t + ['--config.optim.lr=fast'], 2, ('optim.lr', 'fast')),
      Case('override_bad_choice', 'train', t + ['--config.loss.name=bogus'], 2, ('loss.name', 'bogus')),
      Case('override_zero_batch', 'train', t + ['--config.training.batch_size=0'], 2, ('training.batch_size',)),
      Case('override_bad_tuple', 'train', t + ['--config.model.ch_mult=(1,x)'], 2, ('model.ch_mult',)),
      Case('override_bad_ema_rate', 'train', t + ['--config.training.ema_rates=(1.5,)'], 2,
           ('training.ema_rates',)),
      Case('override_unknown_dataset', 'train', t + ['--config.data.name=svhn'], 2, ('data.name', 'svhn')),
      Case('config_argument_unknown_loss', 'train', ['--config=configs/test.py:bogus', '--workdir={new}'], 2,
           ('loss.name', 'bogus')),
      Case('override_infinite_lr', 'train', t + ['--config.optim.lr=inf'], 2, ('optim.lr', 'finite')),
      Case('override_seed_beyond_64_bits', 'train', t + ['--config.seed=1180591620717411303424'], 2, ('seed',)),
      Case('config_returns_none_with_overrides', 'train', ['--config={tmp}/none_config.py', '--workdir={new}',
                                                           '--config.seed=3'], 2, ('none_config.py', 'ConfigDict')),
      # ----- training: flags
      Case('train_missing_workdir', 'train', ['--config=configs/test.py'], 2, ('--workdir',)),
      Case('train_unknown_flag', 'train', t + ['--num_stepz=3'], 2, ('num_stepz',)),
      Case('train_positional_argument', 'train', t + ['extra'], 2, ('extra',)),
      Case('train_workdir_is_a_file', 'train', ['--config=configs/test.py', '--workdir={tmp}/a_file/run'], 1,
           ('--workdir', 'a_file')),
      Case('train_workdir_cannot_be_created', 'train', ['--config=configs/test.py', '--workdir=/proc/cm_jax_no/run'],
           1, ('--workdir', '/proc/cm_jax_no')),
      Case('train_checkpoints_is_a_file', 'train', ['--config=configs/test.py', '--workdir={tmp}/checkpoints_file'],
           1, ('checkpoints_file', 'is a file')),
      Case('train_every_checkpoint_truncated', 'train', ['--config=configs/test.py', '--workdir={tmp}/all_truncated'],
           1, ('all_truncated', 'No readable checkpoint', 'backup')),
      # ----- training: data
      Case('too_few_images_for_the_batch', 'train',
           t + ['--config.data.name=image_folder', '--config.data.manual_dir={tmp}/three_images',
                '--config.data.image_size=16'], 2, ('training.batch_size', 'three_images')),
      Case('data_dir_missing', 'train', t + ['--config.data.source=local', '--config.data.manual_dir={tmp}/nodata'],
           1, ('nodata',)),
      Case('data_file_truncated', 'train',
           t + ['--config.data.source=local', '--config.data.manual_dir={tmp}/truncated_idx'], 1,
           ('truncated_idx',)),
      Case('image_folder_corrupt_image', 'train',
           t + ['--config.data.name=image_folder', '--config.data.manual_dir={tmp}/corrupt_images',
                '--config.data.image_size=16', '--config.training.batch_size=2'], 1, ('broken.png',)),
      Case('image_folder_looping_link', 'train',
           t + ['--config.data.name=image_folder', '--config.data.manual_dir={tmp}/looping_link',
                '--config.data.image_size=16', '--config.training.batch_size=2'], 1, ('looping_link', '9.png')),
      # ----- training: the run in the workdir
      Case('resume_with_other_model', 'train', ['--config=configs/test.py', run, '--config.model.ch=16',
                                                '--config.training.num_steps=6'], 1, ('model.ch',)),
      Case('workdir_busy', 'train', ['--config=configs/test.py', '--workdir={tmp}/busy',
                                     '--config.training.num_steps=6'], 1, ('in use', 'pid')),
      # ----- sampling
      Case('sample_ts_not_a_number', 'sample', [run, '--steps=2', '--ts=abc', '--out={tmp}/o.npz'], 2, ('--ts',)),
      Case('sample_num_zero', 'sample', [run, '--num=0', '--out={tmp}/o.npz'], 2, ('--num',)),
      Case('sample_batch_size_zero', 'sample', [run, '--batch_size=0', '--out={tmp}/o.npz'], 2, ('--batch_size',)),
      Case('sample_out_not_npz', 'sample', [run, '--num=4', '--out={tmp}/o.png'], 2, ('--out',)),
      Case('sample_out_unwritable', 'sample', [run, '--num=4', '--out={tmp}/a_file/o.npz'], 1, ('--out', 'a_file')),
      Case('sample_no_checkpoint', 'sample', ['--workdir={tmp}/empty_run', '--num=4', '--out={tmp}/o.npz'], 1,
           ('empty_run', 'No checkpoint')),
      Case('sample_missing_step', 'sample', [run, '--checkpoint_step=3', '--num=4', '--out={tmp}/o.npz'], 1,
           ('step 3', '[2, 4]')),
      Case('sample_unknown_ema', 'sample', [run, '--ema=0.5', '--num=4', '--out={tmp}/o.npz'], 2, ('ema', '0.5')),
      Case('sample_zero_steps', 'sample', [run, '--steps=0', '--num=4', '--out={tmp}/o.npz'], 2, ('steps',)),
      Case('sample_heun_on_consistency_model', 'sample', [run, '--sampler=heun', '--num=4', '--out={tmp}/o.npz'],
           2, ('heun',)),
      Case('sample_unknown_sampler', 'sample', [run, '--sampler=bogus', '--out={tmp}/o.npz'], 2, ('--sampler',)),
      Case('sample_label_for_unconditional_model', 'sample', [run, '--class_label=3', '--num=4',
                                                             '--out={tmp}/o.npz'], 2, ('--class_label',)),
      Case('sample_too_many', 'sample', [run, '--num=1000000000000', '--out={tmp}/o.npz'], 2, ('--num',)),
      Case('sample_times_out_of_range', 'sample', [run, '--steps=2', '--ts=500', '--num=4', '--out={tmp}/o.npz'],
           2, ('500',)),
      Case('sample_seed_beyond_64_bits', 'sample', [run, '--seed=1180591620717411303424', '--num=4',
                                                    '--out={tmp}/o.npz'], 2, ('--seed',)),
      Case('sample_start_t_out_of_range', 'sample', [run, '--start_t=500', '--num=4', '--out={tmp}/o.npz'],
           2, ('--start_t=500', 'sigma_max')),
      # ----- editing: images, masks and npz files
      Case('edit_input_not_an_image', 'edit', [run, '--task=inpaint', '--input={tmp}/not_an_image.png',
                                               '--out={tmp}/edit'], 1, ('--input', 'not_an_image.png')),
      Case('edit_input_missing', 'edit', [run, '--task=inpaint', '--input={tmp}/missing.npz', '--out={tmp}/edit'], 1,
           ('--input', 'missing.npz')),
      Case('edit_input_empty_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/empty.npz', '--out={tmp}/edit'], 1,
           ('empty.npz', 'no images')),
      Case('edit_input_pickled_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/objects.npz',
                                              '--out={tmp}/edit'], 1, ('objects.npz', 'pickle')),
      Case('edit_input_garbage_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/garbage.npz',
                                              '--out={tmp}/edit'], 1, ('garbage.npz',)),
      Case('edit_input_huge_header_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/huge_header.npz',
                                                  '--out={tmp}/edit'], 1, ('huge_header.npz', 'declares')),
      Case('edit_input_text_file_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/text.npz', '--out={tmp}/edit'],
           1, ('text.npz', 'not an .npz')),
      Case('edit_input_float_npz', 'edit', [run, '--task=inpaint', '--input={tmp}/floats.npz', '--out={tmp}/edit'],
           1, ('floats.npz', 'uint8')),
      Case('edit_input_rgb_for_a_gray_model', 'edit', [run, '--task=inpaint', '--input={tmp}/rgb.npz',
                                                       '--out={tmp}/edit'], 2, ('RGB', 'grayscale')),
      Case('edit_mask_missing', 'edit', [run, '--task=inpaint', '--input={tmp}/images.npz',
                                         '--mask={tmp}/missing_mask.png', '--out={tmp}/edit'], 1,
           ('--mask', 'missing_mask.png')),
      Case('edit_mask_unknown', 'edit', [run, '--task=inpaint', '--input={tmp}/images.npz', '--mask=circle',
                                         '--out={tmp}/edit'], 2, ('--mask', 'circle')),
      Case('edit_needs_input', 'edit', [run, '--task=inpaint', '--out={tmp}/edit'], 2, ('--input',)),
      Case('edit_superres_factor', 'edit', [run, '--task=superres', '--factor=3', '--input={tmp}/images.npz',
                                            '--out={tmp}/edit'], 2, ('3',)),
      Case('edit_times_not_descending', 'edit', [run, '--task=inpaint', '--ts=0.1,0.5', '--input={tmp}/images.npz',
                                                 '--out={tmp}/edit'], 2, ('0.1', '0.5')),
      Case('edit_denoise_sigma', 'edit', [run, '--task=denoise', '--sigma=1000', '--input={tmp}/images.npz',
                                          '--out={tmp}/edit'], 2, ('--sigma',)),
      Case('edit_interpolate_too_many', 'edit', [run, '--task=interpolate', '--num=100000000', '--out={tmp}/edit'],
           2, ('--num', '--alphas')),
      Case('edit_out_unwritable', 'edit', [run, '--task=interpolate', '--out={tmp}/a_file/edit'], 1,
           ('--out', 'a_file')),
      # ----- evaluation
      Case('evaluate_steps_not_integers', 'evaluate', [run, '--steps=a'], 2, ('--steps',)),
      Case('evaluate_output_unwritable', 'evaluate', [run, '--num=8', '--output={tmp}/a_file/x.json'], 1,
           ('--output', 'a_file')),
      # ----- a full disk (a file-size limit) while writing an output over an existing good one
      Case('sample_out_disk_full', 'sample', [run, '--num=64', '--out={tmp}/kept.npz'], 1,
           ('kept.npz', 'unchanged'), file_size_limit=FULL_DISK_BYTES, unchanged=('kept.npz',)),
      Case('edit_out_disk_full', 'edit', [run, '--task=inpaint', '--input={tmp}/many_images.npz',
                                          '--out={tmp}/kept_edit'], 1,
           ('kept_edit', 'unchanged'), file_size_limit=FULL_DISK_BYTES,
           unchanged=('kept_edit/inpaint.npz', 'kept_edit/inpaint.png')),
      Case('evaluate_num_zero', 'evaluate', [run, '--num=0'], 2, ('--num',)),
      Case('evaluate_samples_without_images', 'evaluate', ['--samples={tmp}/empty.npz', '--dataset=fashion_mnist'],
           1, ('empty.npz', 'no images')),
      Case('evaluate_start_t_below_two_step_t', 'evaluate', [run, '--start_t=0.05', '--steps=2', '--num=4'], 2,
           ('sampling.two_step_t', '--ts')),
  ]


FULL_DISK_BYTES = 16 * 1024  # Less than any of those outputs; what the CLIs write before them (nothing) fits.
# Exec wrapper: the file-size limit (writes beyond it fail with EFBIG instead of killing the process by SIGXFSZ).
LIMIT_FILE_SIZE = ('import os, resource, signal, sys; n = int(sys.argv[1]); '
                   'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
                   'resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); '
                   'os.execv(sys.executable, [sys.executable] + sys.argv[2:])')
CASES = _cases()


def _write_inputs(tmp: str) -> None:
  """The bad (and the good) input files the cases refer to."""
  def write(name, text):
    with open(os.path.join(tmp, name), 'w') as f:
      f.write(text)
  write('dict_config.py', 'def get_config():\n  return {"data": {"name": "mnist"}}\n')
  write('syntax_config.py', 'def get_config(:\n')
  write('raising_config.py', 'def get_config():\n  raise RuntimeError("boom")\n')
  write('no_get_config.py', 'X = 1\n')
  write('partial_config.py', 'import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict('
        '{"seed": 0})\n')
  write('none_config.py', 'def get_config():\n  return None\n')
  write('a_file', 'not a directory\n')
  write('text.npz', 'this is a text file, not an npz archive\n' * 10)
  buffer = io.BytesIO()  # An .npy member whose header declares 2e9 images: numpy would try to allocate 1.4 TB.
  np.lib.format.write_array(buffer, np.zeros((2, 28, 28, 1), np.uint8))
  with zipfile.ZipFile(os.path.join(tmp, 'huge_header.npz'), 'w') as z:
    z.writestr('arr_0.npy', buffer.getvalue().replace(b'(2, 28, 28, 1)', b'(2000000000, 28, 28, 1)'))
  os.makedirs(os.path.join(tmp, 'checkpoints_file'))
  write(os.path.join('checkpoints_file', 'checkpoints'), 'a file where the checkpoints folder belongs\n')
  write('not_an_image.png', 'this is text, not a PNG\n')
  with open(os.path.join(tmp, 'garbage.npz'), 'wb') as f:
    f.write(b'PK\x03\x04 not really a zip file')
  rng = np.random.default_rng(0)
  np.savez(os.path.join(tmp, 'empty.npz'), np.zeros((0, 28, 28), np.uint8))
  np.savez(os.path.join(tmp, 'objects.npz'), np.array([{'a': 1}], dtype=object))
  np.savez(os.path.join(tmp, 'floats.npz'), rng.random((2, 28, 28)).astype(np.float32))
  np.savez(os.path.join(tmp, 'rgb.npz'), rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8))
  np.savez(os.path.join(tmp, 'images.npz'), rng.integers(0, 255, (2, 28, 28), dtype=np.uint8))
  np.savez(os.path.join(tmp, 'many_images.npz'), rng.integers(0, 255, (64, 28, 28), dtype=np.uint8))
  # Good outputs of an earlier run, which a write failing for a full disk must leave as they are.
  np.savez(os.path.join(tmp, 'kept.npz'), rng.integers(0, 255, (64, 28, 28, 1), dtype=np.uint8))
  os.makedirs(os.path.join(tmp, 'kept_edit'))
  np.savez(os.path.join(tmp, 'kept_edit', 'inpaint.npz'), result=rng.integers(0, 255, (64, 28, 28, 1), np.uint8))
  Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8)).save(os.path.join(tmp, 'kept_edit', 'inpaint.png'))
  for name, count, broken in (('three_images', 3, False), ('corrupt_images', 4, True)):
    folder = os.path.join(tmp, name, 'class_a')
    os.makedirs(folder)
    for i in range(count):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i}.png'))
    if broken:
      with open(os.path.join(folder, 'broken.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n truncated')
  looping = os.path.join(tmp, 'looping_link', 'class_a')
  os.makedirs(looping)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(os.path.join(looping, f'{i}.png'))
  os.symlink('9.png', os.path.join(looping, '9.png'))  # A link to itself: ELOOP on every read.
  idx = os.path.join(tmp, 'truncated_idx')
  os.makedirs(idx)
  for name in os.listdir(FASHION):
    shutil.copy(os.path.join(FASHION, name), idx)
  with gzip.open(os.path.join(FASHION, 'train-images-idx3-ubyte.gz')) as f:
    head = f.read(16 + 28 * 28 * 100)  # The header promises 60,000 images; 100 are there.
  with gzip.open(os.path.join(idx, 'train-images-idx3-ubyte.gz'), 'wb') as f:
    f.write(head)
  os.makedirs(os.path.join(tmp, 'empty_run'))
  # A live holder of the busy workdir's lock: this test process, on this host, with a fresh heartbeat.
  busy = os.path.join(tmp, 'busy')
  os.makedirs(busy)
  with open(os.path.join(busy, 'LOCK.json'), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'token': 'test', 'started': time.time(),
               'heartbeat': time.time() + 3600, 'command': 'another trainer'}, f)


def _snapshot(root: str) -> dict:
  """Every file under root with its size and modification time."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
  return out


def _digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _env():
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  env.pop('XLA_FLAGS', None)  # One device, as a user's CLI run has.
  return env


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Runs every CLI case (two at a time); returns {name: (case, CompletedProcess, tmp, workdir unchanged)}."""
  tmp = str(tmp_path_factory.mktemp('bad_inputs'))
  _write_inputs(tmp)
  run_dir = os.path.join(tmp, 'run')
  trained = subprocess.run([sys.executable, '-m', 'cm_jax.train', '--config=configs/test.py', f'--workdir={run_dir}',
                            '--config.training.eval_every=100'], capture_output=True, text=True, cwd=REPO_ROOT,
                           env=_env(), timeout=900)
  assert trained.returncode == 0, trained.stderr[-3000:]
  truncated = os.path.join(tmp, 'all_truncated')  # The trained run with every array file of every step cut.
  shutil.copytree(run_dir, truncated)
  for folder, _, names in os.walk(os.path.join(truncated, 'checkpoints')):
    if os.path.basename(folder) == 'd' and names:
      for name in names:
        os.truncate(os.path.join(folder, name), 100)
  before = _snapshot(run_dir)
  busy_before = _snapshot(os.path.join(tmp, 'busy'))

  kept = {name: _digest(os.path.join(tmp, name)) for case in CASES for name in case.unchanged}

  def one(case):
    new = os.path.join(tmp, f'new_{case.name}')
    args = [a.format(run=run_dir, tmp=tmp, new=new) for a in case.args]
    cmd, env = [sys.executable, '-m', f'cm_jax.{case.module}', *args], _env()
    if case.file_size_limit is not None:
      cmd = [sys.executable, '-c', LIMIT_FILE_SIZE, str(case.file_size_limit), *cmd[1:]]
      env.update(JAX_COMPILATION_CACHE_DIR='', JAX_ENABLE_COMPILATION_CACHE='false')  # No cache entries to write.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    changed = [name for name in case.unchanged if _digest(os.path.join(tmp, name)) != kept[name]]
    return case, (result, changed), new

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(one, CASES))
  return {'results': {c.name: (c, r, new) for c, r, new in results}, 'tmp': tmp, 'kept_names': set(kept),
          'run_unchanged': _snapshot(run_dir) == before,
          'busy_unchanged': _snapshot(os.path.join(tmp, 'busy')) == busy_before}


def test_corpus_is_large_enough():
  assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
  assert {c.module for c in CASES} == {'train', 'sample', 'edit', 'evaluate'}


@pytest.mark.parametrize('name', [c.name for c in CASES])
def test_bad_input_ends_with_one_line(corpus, name):
  case, (result, changed), new = corpus['results'][name]
  stderr = result.stderr
  assert result.returncode == case.code, f'exit {result.returncode}, expected {case.code}:\n{stderr[-3000:]}'
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors_lines = [line for line in lines if line.startswith(f'cm_jax.{case.module}: error: ')]
  assert len(errors_lines) == 1 and lines[-1] == errors_lines[0], stderr[-3000:]
  for part in case.names:
    assert part in errors_lines[0], (part, errors_lines[0])
  # Nothing left behind: a new workdir is not created, the trained one is untouched (checked once below).
  assert not os.path.exists(new), os.listdir(new)
  assert not result.stdout.strip() or case.module == 'evaluate', result.stdout
  assert not changed, f'the failed write changed {changed}'
  if case.unchanged:  # Nor a temporary file beside them.
    folders = {os.path.dirname(os.path.join(corpus['tmp'], n)) for n in case.unchanged}
    assert not [f for d in folders for f in os.listdir(d) if f.endswith('.tmp')], folders


def test_trained_and_busy_workdirs_unchanged(corpus):
  assert corpus['run_unchanged'] and corpus['busy_unchanged']
  assert not os.path.exists(os.path.join(corpus['tmp'], 'edit'))
  assert not os.path.exists(os.path.join(corpus['tmp'], 'o.npz'))


def test_verbose_shows_the_traceback(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'cm_jax.sample', f'--workdir={tmp_path}', '--num=4',
                           f'--out={tmp_path}/o.npz', '--verbose'], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=_env(), timeout=600)
  assert result.returncode != 0 and 'Traceback' in result.stderr and 'No checkpoint' in result.stderr


@pytest.mark.parametrize('module, args, started', [
    ('sample', ['--num=200000', '--batch_size=8', '--out={tmp}/sigint.npz'], 'Sampling'),
    ('edit', ['--task=interpolate', '--num=20000', '--batch_size=8', '--out={tmp}/sigint_edit'], 'Editing'),
])
def test_a_cli_started_with_sigint_ignored_still_stops_on_it(corpus, module, args, started):
  """A shell script's background job inherits SIGINT as ignored; `kill -INT` must still stop the tool: exit 130,
  one line, no output file."""
  tmp = corpus['tmp']
  proc = subprocess.Popen([sys.executable, '-m', f'cm_jax.{module}', f'--workdir={tmp}/run',
                           *[a.format(tmp=tmp) for a in args]], cwd=REPO_ROOT, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  try:
    seen = []
    for line in proc.stderr:  # Until the work has started (the model loaded, batches running).
      seen.append(line)
      if started in line:
        break
    assert proc.poll() is None, ''.join(seen)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  stderr = ''.join(seen) + rest
  assert proc.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == f'cm_jax.{module}: error: interrupted.', stderr[-3000:]
  assert 'Traceback' not in stderr and not os.path.exists(os.path.join(tmp, 'sigint.npz'))


# --------------------------------------------------------------------------------------------------
# The notebook API: the same checks raise exceptions (ValueError / FileNotFoundError subclasses) naming the
# field or file, and nothing is written.
# --------------------------------------------------------------------------------------------------
def test_api_train_refuses_a_bad_config_before_writing(tmp_path):
  config = test_config.get_config()
  config.training.batch_size = 0
  with pytest.raises(errors.ConfigError, match='training.batch_size'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_api_load_without_checkpoint_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    inference.load(str(tmp_path))


def test_api_sampling_arguments(corpus):
  model = inference.load(os.path.join(corpus['tmp'], 'run'))
  with pytest.raises(ValueError, match='steps'):
    model.sample(4, steps=0)
  with pytest.raises(ValueError, match='unconditional'):
    model.sample(4, labels=3)
  with pytest.raises(ValueError, match='num'):
    model.sample(0)
  with pytest.raises(ValueError, match='intermediate times'):
    model.sample(4, steps=2, ts=[1.0, 0.5])


# --------------------------------------------------------------------------------------------------
# What counts as a user error (one line) and what as a bug (a traceback).
# --------------------------------------------------------------------------------------------------
def _raised(fn):
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError('nothing raised')


def test_only_deliberate_cm_jax_errors_are_user_errors():
  from cm_jax.runtime import cli
  from cm_jax import edit
  assert cli.user_error_code(_raised(lambda: edit.load_images('/nonexistent.npz'))) == 1
  assert cli.user_error_code(_raised(lambda: cli.parse_ints('steps', ['a']))) == 2
  # Errors of JAX or of builtins, even when the innermost remaining frame is cm_jax's, are bugs.
  bug = _raised(lambda: cli.parse_floats('ts', None)[0])  # TypeError in cm_jax's caller: never a user error.
  assert cli.user_error_code(bug) is None
  jax_bug = _raised(lambda: samplers.sample_in_batches(None, None, None, 4, 0, 4, (2, 2, 1), labels=[1]))
  assert isinstance(jax_bug, ValueError) and cli.user_error_code(jax_bug) == 1  # A raise statement of cm_jax.
  # A ValueError of a builtin (or of JAX, whose frames JAX removes from tracebacks) whose innermost frame is a
  # cm_jax line that is not a raise statement: a bug, shown with its traceback.
  builtin_error = _raised(lambda: exec(compile("int('x')", os.path.join(cli.PACKAGE_DIR, 'fake_module.py'), 'exec')))
  assert isinstance(builtin_error, ValueError) and cli.user_error_code(builtin_error) is None


def test_errors_raised_in_any_folder_of_the_package_are_cm_jax_errors():
  # cli.py lives in cm_jax/runtime/; what counts as cm_jax's own code is still the whole package.
  import cm_jax
  from cm_jax.core import sampling
  from cm_jax.runtime import cli
  assert cli.PACKAGE_DIR == os.path.dirname(os.path.abspath(cm_jax.__file__))
  core_error = _raised(lambda: sampling.validate_times((5.0,), 0.002, 1.0))  # A raise statement in cm_jax/core/.
  assert isinstance(core_error, ValueError) and cli.user_error_code(core_error) == 1
  outside = _raised(lambda: exec(compile("raise ValueError('x')", os.path.join(os.path.dirname(cli.PACKAGE_DIR),
                                                                               'other_package.py'), 'exec')))
  assert cli.user_error_code(outside) is None


def test_library_tracebacks_are_hidden_from_the_console_only():
  import logging as pylogging
  from cm_jax.runtime import cli
  inner = pylogging.Formatter('%(message)s')
  formatter = cli._NoLibraryTracebacks(inner)  # pylint: disable=protected-access
  try:
    raise OSError('disk')
  except OSError:
    exc_info = sys.exc_info()
  library = pylogging.LogRecord('orbax', pylogging.ERROR, '/site-packages/orbax/x.py', 1, 'failed', None, exc_info)
  ours = pylogging.LogRecord('cm_jax', pylogging.ERROR, os.path.join(cli.PACKAGE_DIR, 'train.py'), 1, 'failed',
                             None, exc_info)
  assert formatter.format(library) == 'failed' and library.exc_info is exc_info  # The record is untouched.
  assert 'Traceback' in formatter.format(ours)
