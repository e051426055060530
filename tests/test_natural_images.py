"""End-to-end on RGB data: an image folder of two coloured classes, class-conditional training and sampling,
bf16 mixed precision, exact resume, colorization through the edit CLI, and the RGB evaluation defaults."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cm_jax import inference
from cm_jax import train
from cm_jax.configs import test as test_config
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.evaluation import evaluator
from tiny_runs import tiny_config
from tiny_runs import tree_equal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {'blue': (20, 40, 220), 'red': (220, 30, 20)}  # Sorted folder order: blue = 0, red = 1.


def make_folder(root, per_class: int = 6) -> str:
  """Two class folders of solid-colour images (mixed sizes, PNG and JPEG) with a little noise."""
  rng = np.random.default_rng(0)
  for name, rgb in COLOURS.items():
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      h, w = (20 + 2 * i, 24) if i % 2 else (18, 18 + 3 * i)
      pixels = np.clip(np.asarray(rgb) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
      ext = 'png' if i % 2 else 'jpg'
      Image.fromarray(pixels).save(os.path.join(root, name, f'{i}.{ext}'))
  return str(root)


def rgb_config(folder: str, **overrides):
  """configs/test.py on the image folder at 16x16 with flips, plus dotted overrides."""
  return tiny_config(**{'data.name': 'image_folder', 'data.manual_dir': folder, 'data.image_size': 16,
                        'data.random_flip': True, **overrides})


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('images') / 'root')


@pytest.fixture(scope='module')
def conditional_run(folder, tmp_path_factory):
  """A class-conditional tiny CT model trained long enough to tell red from blue."""
  workdir = str(tmp_path_factory.mktemp('conditional'))
  config = rgb_config(folder, **{'model.class_conditional': True, 'model.num_classes': 2,
                                 'training.num_steps': 120, 'training.checkpoint_every': 60,
                                 'training.eval_every': 120, 'training.log_every': 20,
                                 'training.num_eval_samples': 8, 'optim.lr': 2e-3, 'model.dropout': 0.0,
                                 'training.ema_rates': (0.9,)})
  state = train.train_and_evaluate(config, workdir)
  return workdir, config, state


def test_rgb_image_folder_run_writes_rgb_grids(conditional_run):
  workdir, config, state = conditional_run
  assert int(state.step) == 120
  grid = np.asarray(Image.open(os.path.join(workdir, 'samples', 'step_00000120.png')))
  assert grid.ndim == 3 and grid.shape[-1] == 3
  model = inference.load(workdir)
  assert model.image_shape == (16, 16, 3) and model.num_classes == 2


def test_class_label_reaches_the_network(conditional_run):
  """The same noise with another label gives another image."""
  workdir, _, _ = conditional_run
  model = inference.load(workdir)
  blue = model.sample_float(4, seed=3, labels=0)
  red = model.sample_float(4, seed=3, labels=1)
  assert np.abs(blue - red).max() > 0.05


def test_sample_cli_class_label_gives_that_class(conditional_run, tmp_path):
  """--class_label=K: every sample is of class K (red = 1 is redder than blue = 0) and arr_1 holds K."""
  workdir, _, _ = conditional_run
  means = {}
  for label in (0, 1):
    out = tmp_path / f'class{label}.npz'
    subprocess.run([sys.executable, '-m', 'cm_jax.sample', f'--workdir={workdir}', '--num=16',
                    f'--class_label={label}', f'--out={out}'], check=True, cwd=REPO_ROOT, capture_output=True)
    with np.load(out) as f:
      samples, labels = f['arr_0'], f['arr_1']
    assert samples.shape == (16, 16, 16, 3) and samples.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.full(16, label))
    means[label] = samples.reshape(-1, 3).astype(np.float32).mean(axis=0)
  red, blue = means[1], means[0]
  assert red[0] - red[2] > 40, means  # Class 1 (red): more red than blue ...
  assert blue[2] - blue[0] > 40, means  # ... class 0 (blue): the other way round.


def test_sample_cli_draws_labels_uniformly_and_saves_them(conditional_run, tmp_path):
  workdir, _, _ = conditional_run
  out = tmp_path / 'uniform.npz'
  subprocess.run([sys.executable, '-m', 'cm_jax.sample', f'--workdir={workdir}', '--num=40', f'--out={out}'],
                 check=True, cwd=REPO_ROOT, capture_output=True)
  with np.load(out) as f:
    labels = f['arr_1']
  assert labels.shape == (40,) and set(labels.tolist()) == {0, 1}
  model = inference.load(workdir)
  np.testing.assert_array_equal(labels, model.labels(40, seed=0))
  np.testing.assert_array_equal(model.labels(10, seed=0), labels[:10])  # A longer draw extends a shorter one.


def test_sample_cli_refuses_a_bad_class_label(conditional_run, tmp_path):
  workdir, _, _ = conditional_run
  result = subprocess.run([sys.executable, '-m', 'cm_jax.sample', f'--workdir={workdir}', '--num=2',
                           '--class_label=7', f'--out={tmp_path / "x.npz"}'], cwd=REPO_ROOT, capture_output=True,
                          text=True)
  assert result.returncode != 0
  assert 'lie in [0, 2)' in result.stderr and 'Traceback' not in result.stderr


def test_labels_api_errors(conditional_run):
  workdir, _, _ = conditional_run
  model = inference.load(workdir)
  with pytest.raises(ValueError, match='one class label per sample'):
    model.sample(3, labels=[0, 1])
  with pytest.raises(ValueError, match=r'lie in \[0, 2\)'):
    model.sample(2, labels=[0, 5])


def test_colorize_runs_end_to_end_through_the_edit_cli(conditional_run, tmp_path):
  """Colorization of an RGB model through the CLI: the result keeps the luminance of the input."""
  workdir, _, _ = conditional_run
  model = inference.load(workdir)
  clean = model.sample(4, labels=1, seed=1)
  np.savez(tmp_path / 'clean.npz', clean)
  result = subprocess.run([sys.executable, '-m', 'cm_jax.edit', f'--workdir={workdir}', '--task=colorize',
                           f'--input={tmp_path / "clean.npz"}', f'--out={tmp_path / "out"}', '--num=4',
                           '--class_label=1'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(tmp_path / 'out' / 'colorize.npz') as f:
    original, degraded, edited = f['original'], f['degraded'], f['result']
  assert edited.shape == (4, 16, 16, 3)
  weights = np.asarray([0.2989, 0.5870, 0.1140])
  luminance = lambda x: (x.astype(np.float64) * weights).sum(-1) / weights.sum()
  # Exact up to uint8 rounding (0.5 a channel) where no channel of the result was clipped to [0, 255].
  unclipped = np.all((edited > 0) & (edited < 255), axis=-1)
  assert unclipped.mean() > 0.5
  assert np.abs(luminance(edited) - luminance(original))[unclipped].max() <= 1.0
  assert np.ptp(degraded.astype(np.int32), axis=-1).max() <= 1  # The input the model saw is gray.
  assert os.path.exists(tmp_path / 'out' / 'colorize.png')
  missing = subprocess.run([sys.executable, '-m', 'cm_jax.edit', f'--workdir={workdir}', '--task=colorize',
                            f'--input={tmp_path / "clean.npz"}', f'--out={tmp_path / "out2"}'], cwd=REPO_ROOT,
                           capture_output=True, text=True)
  assert missing.returncode != 0 and '--class_label' in missing.stderr


def test_rgb_resume_is_bit_identical(folder, tmp_path, preempt_at):
  """An unconditional RGB run: 6 steps straight == 4 steps, a kill, and 2 more."""
  config = rgb_config(folder, **{'training.num_steps': 6, 'training.checkpoint_every': 4,
                                 'training.eval_every': 6})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  preempt_at(4)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 6
  assert tree_equal(straight.params, resumed.params)
  assert tree_equal(straight.ema_params, resumed.ema_params)
  assert tree_equal(straight.opt_state, resumed.opt_state)


def test_bfloat16_run_trains_with_float32_state(folder, tmp_path):
  config = rgb_config(folder, **{'training.precision': 'bfloat16'})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  for tree in (state.params, state.ema_params, state.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(leaf)))
  denoiser = denoiser_lib.make_denoiser(config)
  x = jnp.zeros((2, 16, 16, 3))
  out = denoiser(state.params, x, jnp.full((2,), 1.0))
  assert out.dtype == jnp.float32


def test_class_count_mismatch_is_refused_before_training(folder, tmp_path):
  config = rgb_config(folder, **{'model.class_conditional': True, 'model.num_classes': 5})
  with pytest.raises(ValueError, match='num_classes=2'):
    train.train_and_evaluate(config, str(tmp_path))


def test_rgb_datasets_default_to_inception_features():
  config = test_config.get_config()
  for name, kind in (('cifar10', 'inception'), ('imagenette', 'inception'), ('image_folder', 'inception'),
                     ('fashion_mnist', 'classifier')):
    config.data.name = name
    assert evaluator.feature_net_kind(config) == kind


def test_streamed_training_equals_in_memory_training_and_may_resume_it(folder, tmp_path):
  """data.storage = 'stream' (decoded by worker processes here) reads the same rows at every step: the same
  parameters as 'memory', and a run started in memory resumes streamed, or from a prepared folder (the
  recorded data fingerprint names the files, not the storage), to the same parameters."""
  conditional = {'model.class_conditional': True, 'model.num_classes': 2}
  memory = train.train_and_evaluate(rgb_config(folder, **conditional), str(tmp_path / 'memory'))
  streamed_config = rgb_config(folder, **conditional, **{'data.storage': 'stream', 'data.decode_workers': 2})
  streamed = train.train_and_evaluate(streamed_config, str(tmp_path / 'stream'))
  assert tree_equal(memory.params, streamed.params)
  shutil.copytree(tmp_path / 'memory', tmp_path / 'memory_copy')
  longer = rgb_config(folder, **conditional, **{'data.storage': 'stream', 'training.num_steps': 6})
  resumed = train.train_and_evaluate(longer, str(tmp_path / 'memory'))
  assert int(resumed.step) == 6
  prepared_dir = str(tmp_path / 'prepared')
  subprocess.run([sys.executable, '-m', 'cm_jax.prepare', '--config=cm_jax/configs/test.py',
                  '--config.data.name=image_folder', f'--config.data.manual_dir={folder}',
                  '--config.data.image_size=16', f'--out={prepared_dir}', '--workers=0'], cwd=REPO_ROOT, check=True,
                 capture_output=True)
  from_prepared = rgb_config(folder, **conditional, **{'data.storage': 'prepared', 'training.num_steps': 6,
                                                       'data.prepared_dir': prepared_dir})
  resumed_prepared = train.train_and_evaluate(from_prepared, str(tmp_path / 'memory_copy'))
  assert int(resumed_prepared.step) == 6 and tree_equal(resumed.params, resumed_prepared.params)


def test_edit_cli_reads_images_as_the_trainer_does(conditional_run, tmp_path):
  """A folder of an RGBA PNG of another size, a grayscale JPEG and a 16-bit grayscale PNG: alpha dropped, gray
  replicated (16-bit scaled, not clipped to white), sizes centre-cropped and resized, each conversion said."""
  workdir, _, _ = conditional_run
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  Image.fromarray(np.full((30, 40, 4), (220, 30, 20, 128), np.uint8)).save(inputs / 'a_rgba.png')
  Image.fromarray(np.full((20, 20), 90, np.uint8)).save(inputs / 'b_gray.jpg')
  Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(inputs / 'c_gray16.png')
  assert Image.open(inputs / 'c_gray16.png').mode.startswith('I')
  result = subprocess.run([sys.executable, '-m', 'cm_jax.edit', f'--workdir={workdir}', '--task=inpaint',
                           f'--input={inputs}', f'--out={tmp_path / "out"}', '--class_label=1', '--ts=80,2'],
                          cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  for note in ('dropped the alpha channel', 'replicated the gray channel to RGB',
               'centre-cropped and resized 40x30 to 16x16', 'centre-cropped and resized 20x20 to 16x16'):
    assert note in result.stdout, result.stdout
  with np.load(tmp_path / 'out' / 'inpaint.npz') as f:
    original = f['original']
  assert original.shape == (3, 16, 16, 3)
  assert np.all(original[0] == (220, 30, 20))  # A solid colour stays exact through crop and resize.
  assert np.all(np.abs(original[1].astype(int) - 90) <= 2)  # JPEG rounding.
  assert np.all(original[2] == round(40000 * 255 / 65535))  # Not 255.


def test_edit_takes_one_label_per_image_from_the_npz(conditional_run, tmp_path):
  """An .npz with labels in 'arr_1' (as cm_jax.sample saves them) edits image i as its own class: the same result
  as editing all images as that class, image by image."""
  workdir, _, _ = conditional_run
  model = inference.load(workdir)
  from cm_jax import edit  # pylint: disable=g-import-not-at-top
  clean = model.sample(4, labels=[0, 1, 0, 1], seed=2)
  labels = np.array([0, 1, 1, 0], np.int32)
  each = edit.run_task(model, 'inpaint', clean, ts=[80.0, 2.0], class_label=labels, num=4)['result']
  as_0 = edit.run_task(model, 'inpaint', clean, ts=[80.0, 2.0], class_label=0, num=4)['result']
  as_1 = edit.run_task(model, 'inpaint', clean, ts=[80.0, 2.0], class_label=1, num=4)['result']
  expected = np.where(labels[:, None, None, None] == 0, as_0, as_1)
  np.testing.assert_array_equal(each, expected)
  assert not np.array_equal(as_0, as_1)
  np.savez(tmp_path / 'labelled.npz', clean, labels)
  result = subprocess.run([sys.executable, '-m', 'cm_jax.edit', f'--workdir={workdir}', '--task=inpaint',
                           f'--input={tmp_path / "labelled.npz"}', f'--out={tmp_path / "out"}', '--ts=80,2',
                           '--num=4'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Editing each image as its class in" in result.stdout
  with np.load(tmp_path / 'out' / 'inpaint.npz') as f:
    np.testing.assert_array_equal(f['result'], expected)


def test_offline_metric_for_rgb_data_with_a_classifier_trained_on_its_labels(conditional_run, tmp_path):
  """`evaluate --feature_net=classifier` on an RGB image-folder run: a classifier of the folder's 2 classes
  (every tenth image held out for its accuracy), the train split as the reference (an image folder's only
  one), and a report that says it is not an Inception FID."""
  workdir, _, _ = conditional_run
  result = subprocess.run([sys.executable, '-m', 'cm_jax.evaluate', f'--workdir={workdir}', '--num=16',
                           '--steps=1', '--feature_net=classifier', f'--cache_dir={tmp_path / "cache"}',
                           f'--output={tmp_path / "eval.json"}'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  report = json.loads((tmp_path / 'eval.json').read_text())
  net, reference = report['protocol']['feature_net'], report['protocol']['reference']
  assert net['comparable_to_published_fid'] is False and 'not Inception' in net['name']
  assert reference['split'] == 'train' and reference['image_shape'] == [16, 16, 3]
  assert np.isfinite(report['results'][0]['classifier_fd'])
  info = json.loads(next((tmp_path / 'cache' / 'classifier').glob('*.json')).read_text())
  assert info['num_classes'] == 2 and info['num_test'] == 1 and info['num_train'] == 11


def test_num_classes_zero_takes_the_folders_count(folder, tmp_path):
  config = rgb_config(folder, **{'model.class_conditional': True, 'model.num_classes': 0,
                                 'training.num_steps': 1, 'training.eval_every': 1000})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert inference.load(str(tmp_path / 'run')).config.model.num_classes == 2  # Recorded in the checkpoint.
