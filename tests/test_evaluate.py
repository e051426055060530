"""Evaluation: ternary search, the feature classifier and its cache, reference caching, scoring, in-training
evaluation and the evaluate CLI (mock TFDS data and the real offline Fashion-MNIST files)."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cm_jax import evaluate
from cm_jax import input_pipeline
from cm_jax import samplers
from cm_jax import train
from cm_jax.configs import test as test_config
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import karras
from cm_jax.core import sampling
from cm_jax.evaluation import classifier
from cm_jax.evaluation import evaluator
from cm_jax.evaluation import metrics
from cm_jax.evaluation import two_step_search
from cm_jax.runtime import errors
import fake_inception

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------- Ternary search.
@pytest.mark.parametrize('lo,hi', [(1, 16), (1, 38), (0, 2), (3, 3)])
def test_ternary_search_finds_every_minimum(lo, hi):
  for best in range(lo, hi + 1):
    calls = []

    def metric(i):
      calls.append(i)
      return (i - best) ** 2 + 0.5 * abs(i - best)

    assert two_step_search.ternary_search(metric, lo, hi) == best
    if hi - lo > 30:
      assert len(set(calls)) < (hi - lo + 1) // 2  # Far fewer evaluations than an exhaustive scan.


def test_ternary_search_empty_range():
  with pytest.raises(ValueError, match='Empty search range'):
    two_step_search.ternary_search(lambda i: 0.0, 5, 4)


def test_two_step_search_reports_the_grid_time():
  """A metric minimal at sigma = 0.585 picks index 11 of the 18-point grid, as CM's CIFAR-10 CD search."""
  config = test_config.get_config()
  calls = []

  def score_at_time(t):
    calls.append(t)
    return {'classifier_fd': float(np.log(t / 0.585) ** 2)}

  result = two_step_search.search_two_step_time(score_at_time, 'classifier_fd', config, 18)
  grid = np.asarray(karras.karras_grid(18, 0.002, 80.0, 7.0))[::-1]
  assert result['best_index'] == 11 and result['best_t'] == pytest.approx(float(grid[11]), rel=1e-6)
  assert result['best_t'] == pytest.approx(0.585, abs=0.002)
  assert len(calls) == len(set(calls)) == len(result['evaluated'])  # Each candidate sampled once.
  assert all(0.002 < t < 80.0 for t in calls)
  with pytest.raises(ValueError, match='search_points'):
    two_step_search.search_two_step_time(score_at_time, 'classifier_fd', config, 2)


# ------------------------------------------------------------------------------------ The classifier.
def test_classifier_learns_a_separable_task():
  """Class c lights up row block c: a working classifier gets (nearly) all test images right."""
  rng = np.random.default_rng(0)

  def make(n):
    labels = rng.integers(0, 4, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 7 * c:7 * c + 7] = 255
    return images, labels

  params, accuracy = classifier.train_classifier(*make(256), *make(64), steps=60, batch_size=32, lr=3e-3,
                                                 seed=0, num_classes=4)
  assert accuracy > 0.95
  net = classifier.Classifier(params, 4, (28, 28, 1), {})
  features, probs = net(make(5)[0], batch_size=2)  # Batches of 2 with a padded last one.
  assert features.shape == (5, classifier.FEATURE_DIM) and probs.shape == (5, 4)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='uint8'):
    net(np.zeros((2, 28, 28, 1), np.float32))


def mock_config(tmp_path, **evaluation):
  config = test_config.get_config()
  config.data.name = 'mnist'
  config.data.source = 'tfds'
  config.evaluation.cache_dir = str(tmp_path / 'cache')
  for key, value in evaluation.items():
    config.evaluation[key] = value
  return config


def test_classifier_is_trained_once_and_cached(tmp_path, monkeypatch):
  config = mock_config(tmp_path)
  with tfds.testing.mock_data(num_examples=40):
    first = classifier.load_or_train(config)
    assert 0.0 <= first.info['test_accuracy'] <= 1.0 and first.info['num_train'] == 40
    monkeypatch.setattr(classifier, 'train_classifier', lambda *a, **k: pytest.fail('retrained a cached one'))
    again = classifier.load_or_train(config)
    assert again.cache_id == first.cache_id and again.info == first.info
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)))
    assert first.protocol()['comparable_to_published_fid'] is False
    config.evaluation.classifier_steps += 1  # Other settings: another cache entry.
    with pytest.raises(pytest.fail.Exception, match='retrained'):
      classifier.load_or_train(config)


# ---------------------------------------------------------------------------------- Scoring, references.
def pixel_net(calls=None):
  """A stand-in feature network: 16 pixel averages as features, a softmax over 4 of them as probabilities."""
  def fn(images):
    if calls is not None:
      calls.append(len(images))
    x = images.astype(np.float64).reshape(len(images), 4, 7, 4, 7).mean(axis=(2, 4)).reshape(len(images), 16)
    x = x / 255.0 + 1e-3 * np.arange(16)
    p = np.exp(4 * x[:, :4])
    return x, p / p.sum(1, keepdims=True)
  return evaluator.FeatureNet('classifier', fn, 'pixels', {'name': 'pixel averages'})


def test_reference_is_cached_and_identical_images_score_zero(tmp_path):
  config = mock_config(tmp_path, reference_split='test', num_reference=30)
  calls = []
  with tfds.testing.mock_data(num_examples=40):
    ref = evaluator.load_reference(config, pixel_net(calls))
    again = evaluator.load_reference(config, pixel_net(calls))
    images = input_pipeline.load_images(config.data, 'test')[evaluator.reference_indices(40, 30)]
  assert calls == [30]  # The second load read the cache.
  np.testing.assert_array_equal(ref.features, again.features)
  assert ref.info['num'] == 30 and ref.info['split'] == 'test'
  scorer = evaluator.Evaluator(pixel_net(), ref, pr_k=3)
  same = scorer.score(images)
  assert abs(same['classifier_fd']) < 1e-6
  assert same['precision'] == 1.0 and same['recall'] == 1.0
  shifted = scorer.score(np.clip(images.astype(np.int32) + 40, 0, 255).astype(np.uint8))
  assert shifted['classifier_fd'] > 100 * max(abs(same['classifier_fd']), 1e-9)
  assert set(same) == {'classifier_fd', 'classifier_score', 'classifier_score_std', 'precision', 'recall',
                       'precision_recall_k', 'class_fractions', 'class_balance_tv'} and same['precision_recall_k'] == 3
  assert len(same['class_fractions']) == 4 and abs(sum(same['class_fractions']) - 1.0) < 1e-3
  assert same['class_balance_tv'] == evaluator.class_balance_tv(same['class_fractions'])


def test_class_fractions_and_balance_by_hand():
  probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
  np.testing.assert_array_equal(evaluator.class_fractions(probs), [0.5, 0.25, 0.25])
  # |1/2 - 1/3| + 2 |1/4 - 1/3| = 1/6 + 1/6, halved.
  assert abs(evaluator.class_balance_tv([0.5, 0.25, 0.25]) - 1 / 6) < 1e-12
  assert evaluator.class_balance_tv([0.1] * 10) == 0.0
  assert abs(evaluator.class_balance_tv([1.0] + [0.0] * 9) - 0.9) < 1e-12  # One class only: 1 - 1/K.


def pixel_evaluator(num_reference=30):
  """An Evaluator of pixel_net against random reference images (no data set, no cache)."""
  images = np.random.default_rng(1).integers(0, 256, (num_reference, 28, 28, 1)).astype(np.uint8)
  features, _ = pixel_net().fn(images)
  reference = evaluator.Reference(features, metrics.FeatureStats.from_features(features), {'num': num_reference})
  return evaluator.Evaluator(pixel_net(), reference, pr_k=3)


def test_run_yields_the_scores_by_name():
  """Evaluator.run yields (name, value) pairs, one per score, in the order of score()'s dict."""
  scorer = pixel_evaluator()
  images = np.random.default_rng(2).integers(0, 256, (12, 28, 28, 1)).astype(np.uint8)
  pairs = list(scorer.run(images))
  names = [name for name, _ in pairs]
  assert names == ['classifier_fd', 'classifier_score', 'classifier_score_std', 'precision', 'recall',
                   'precision_recall_k', 'class_fractions', 'class_balance_tv']
  assert dict(pairs) == scorer.score(images) and list(scorer.score(images)) == names
  with pytest.raises(ValueError, match='at least 2 images'):
    scorer.score(images[:1])


@dataclasses.dataclass(frozen=True)
class FakeSampler:
  """What evaluation reads of a sampler (evaluator.Sampler)."""
  name: str
  steps: int
  times: tuple = ()
  start_t: float = None
  sigma_max: float = 80.0

  @property
  def first_time(self) -> float:
    return self.sigma_max if self.start_t is None else self.start_t

  def describe(self) -> str:
    return f'{self.name} x{self.steps}'


class FakeEvaluator:
  """Scores images by their mean pixel, plus the two non-scalar keys of the real Evaluator."""
  def score(self, images):
    return {'fd': float(images.mean()), 'precision_recall_k': 3, 'class_fractions': [0.5, 0.5]}


def test_score_samplers_samples_and_scores_each_sampler_in_order(monkeypatch):
  lines, calls = [], []
  monkeypatch.setattr(evaluator.logging, 'info', lambda fmt, *args: lines.append(fmt % args))

  def sample(spec, num):
    calls.append((spec.name, spec.steps, num))
    time.sleep(0.02)
    return np.full((num, 4, 4, 1), spec.steps, np.uint8)

  specs = [FakeSampler('consistency', 1), FakeSampler('consistency', 2, (0.8,), start_t=40.0),
           FakeSampler('heun', 18)]
  results = evaluator.score_samplers(sample, FakeEvaluator(), specs, 5)
  assert calls == [('consistency', 1, 5), ('consistency', 2, 5), ('heun', 18, 5)]
  assert list(results[0]) == ['sampler', 'steps', 'times', 'start_t', 'description', 'sampling_seconds', 'fd',
                              'precision_recall_k', 'class_fractions']
  assert [r['description'] for r in results] == ['consistency x1', 'consistency x2', 'heun x18']
  assert [r['fd'] for r in results] == [1.0, 2.0, 18.0]
  assert results[0]['start_t'] == 80.0 and results[0]['times'] == []  # sigma_max: the sampler sets no start_t.
  assert results[1]['start_t'] == 40.0 and results[1]['times'] == [0.8]
  assert 'start_t' not in results[2]  # EDM samplers start at sigma_max, always.
  assert all(r['sampling_seconds'] >= 0.02 for r in results)
  assert len(lines) == 3 and lines[2].startswith('heun x18: fd 18.0000, precision_recall_k 3.0000 (')
  assert lines[2].endswith(' s scoring)') and 's sampling, ' in lines[2]
  assert evaluator.scalar_scores(results[2]) == {'fd': 18.0}  # No sampler fields, k or list.
  assert [evaluator.sampler_key(s) for s in specs] == ['1step', '2step', 'heun18']


def test_samples_file_is_cropped_checked_and_cut(tmp_path):
  images = np.arange(5 * 32 * 32, dtype=np.int64).reshape(5, 32, 32, 1).astype(np.uint8)
  path = str(tmp_path / 'edm.npz')
  np.savez(path, arr_0=images)
  out = evaluate.load_samples_file(path, (28, 28, 1), crop=2, num=3)
  np.testing.assert_array_equal(out, images[:3, 2:30, 2:30])
  with pytest.raises(errors.UsageError, match=r'--crop=2 cuts the 2-pixel border'):
    evaluate.load_samples_file(path, (28, 28, 1))
  with pytest.raises(errors.UsageError, match=r'--num=6, but'):
    evaluate.load_samples_file(path, (28, 28, 1), crop=2, num=6)
  np.savez(path, arr_0=images.astype(np.float32))
  with pytest.raises(errors.InputFileError, match='expected uint8 images'):
    evaluate.load_samples_file(path, (32, 32, 1))
  np.savez(path, a=images, b=images)
  with pytest.raises(errors.InputFileError, match=r"holds arrays \['a', 'b'\]"):
    evaluate.load_samples_file(path, (32, 32, 1))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(errors.InputFileError, match='not an .npz file'):
    evaluate.load_samples_file(str(tmp_path / 'junk.npz'), (32, 32, 1))


def test_inception_feature_net_from_config(tmp_path):
  """feature_net = 'inception' loads the graph from evaluation.inception_path and reports the protocol."""
  _, pb, _ = fake_inception.write(tmp_path)
  config = mock_config(tmp_path, feature_net='inception', inception_path=pb)
  net = evaluator.make_feature_net(config)
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
  features, probs = net.fn(images)
  expected_f, expected_p = fake_inception.expected_outputs(images, fake_inception.fake_weights())
  np.testing.assert_allclose(features, expected_f, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(probs, expected_p, rtol=1e-4, atol=1e-5)
  assert net.fd_key == 'fid' and net.protocol['comparable_to_published_fid'] is True
  config.evaluation.inception_path = str(tmp_path / 'missing.pb')
  with pytest.raises(FileNotFoundError, match='missing.pb'):
    evaluator.make_feature_net(config)


def test_auto_feature_net_and_validation():
  config = test_config.get_config()
  assert evaluator.feature_net_kind(config) == 'classifier'
  config.evaluation.feature_net = 'inceptionv3'
  with pytest.raises(ValueError, match='evaluation.feature_net'):
    evaluator.feature_net_kind(config)


# --------------------------------------------------------------------- In training and from the CLI.
def scalars(workdir):
  out = {}
  for name in os.listdir(workdir):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
        for value in event.summary.value:
          if value.tag.startswith('eval/'):
            out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def test_in_training_evaluation_writes_scores(tmp_path):
  config = mock_config(tmp_path, every=2, num_samples=6)
  with tfds.testing.mock_data(num_examples=40):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  written = scalars(str(tmp_path / 'run'))
  for sampler in ('1step', '2step'):
    for metric in ('classifier_fd', 'classifier_score', 'precision', 'recall', 'class_balance_tv'):
      tag = f'eval/{sampler}/{metric}'
      assert sorted(written[tag]) == [2, 4], (tag, sorted(written))
      assert all(np.isfinite(v) for v in written[tag].values())
  assert written['eval/1step/classifier_fd'][4] > 0.0
  assert not any(tag.endswith('class_fractions') for tag in written)  # A list: the JSON report only.


def run_module(module, *args):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                        env=env, timeout=900)


def test_evaluate_cli_on_offline_fashion_mnist(tmp_path):
  """Train a tiny run on the real local Fashion-MNIST files, then evaluate it: one JSON object on stdout."""
  run = run_module('cm_jax.train', '--config=configs/test.py', f'--workdir={tmp_path}/run',
                   '--config.data.source=local')
  assert run.returncode == 0, run.stderr[-3000:]
  result = run_module('cm_jax.evaluate', f'--workdir={tmp_path}/run', '--num=12', '--steps=1,2', '--batch_size=6',
                      f'--cache_dir={tmp_path}/cache', '--num_reference=200', '--search_two_step',
                      '--search_points=6', '--search_num=8', '--memorization=12', f'--output={tmp_path}/e.json')
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  with open(tmp_path / 'e.json') as f:
    assert json.load(f) == out
  assert [r['steps'] for r in out['results']] == [1, 2]
  assert [r['start_t'] for r in out['results']] == [80.0, 80.0]  # sigma_max: the config sets no start_t.
  assert all(np.isfinite(r['classifier_fd']) and 0 <= r['precision'] <= 1 for r in out['results'])
  protocol = out['protocol']
  assert protocol['num_samples'] == 12 and protocol['reference']['split'] == 'test'
  assert protocol['reference']['num'] == 200 and protocol['feature_net']['comparable_to_published_fid'] is False
  assert protocol['reference']['image_shape'] == [28, 28, 1] and protocol['sampling_seed'] == 0
  assert protocol['reference']['preprocessing'] == 'none (28x28 as stored)'
  assert 'class_labels' not in protocol  # Unconditional.
  assert 0.0 <= protocol['feature_net']['test_accuracy'] <= 1.0
  search = out['two_step_search']
  assert 1 <= search['best_index'] <= 4 and search['best_t'] in [e['t'] for e in search['evaluated']]
  assert out['memorization']['num_train'] == 60000 and out['memorization']['num_samples'] == 12
  assert 'Training the fashion_mnist feature classifier' in result.stderr
  # --start_t below the run's two-step time: one step is fine (the two-step time is not used).
  result = run_module('cm_jax.evaluate', f'--workdir={tmp_path}/run', '--num=6', '--steps=1', '--start_t=1',
                      f'--cache_dir={tmp_path}/cache', '--num_reference=200')
  assert result.returncode == 0, result.stderr[-3000:]
  assert [r['start_t'] for r in json.loads(result.stdout)['results']] == [1.0]
  bad = run_module('cm_jax.evaluate', f'--workdir={tmp_path}/run', '--steps=1,2', '--ts=1.0')
  assert bad.returncode != 0 and '--ts needs a single --steps value' in bad.stderr
  assert all(len(r['class_fractions']) == 10 and 0 <= r['class_balance_tv'] <= 0.9 for r in out['results'])

  # Images made elsewhere (as the PyTorch reference writes them: 32x32, zero-padded), scored with the same
  # cached classifier: the test images themselves score FD ~0 against themselves, with balanced classes.
  data = test_config.get_config().data
  data.source = 'local'
  test_images = input_pipeline.load_images(data, 'test')
  rows = evaluator.reference_indices(len(test_images), 200)
  np.savez(tmp_path / 'ext.npz', arr_0=np.pad(test_images[rows], ((0, 0), (2, 2), (2, 2), (0, 0))))
  ext = run_module('cm_jax.evaluate', f'--samples={tmp_path}/ext.npz', '--crop=2', f'--cache_dir={tmp_path}/cache',
                   '--num_reference=200', '--eval_config=test')  # The tiny classifier the run above cached.
  assert ext.returncode == 0, ext.stderr[-3000:]
  scored = json.loads(ext.stdout)
  (result,) = scored['results']
  assert result['sampler'] == 'external' and result['num'] == 200 and scored['dataset'] == 'fashion_mnist'
  assert abs(result['classifier_fd']) < 1e-3 and result['precision'] == 1.0 and result['recall'] == 1.0
  assert len(result['class_fractions']) == 10 and abs(sum(result['class_fractions']) - 1.0) < 1e-3
  assert abs(result['class_balance_tv'] - evaluator.class_balance_tv(result['class_fractions'])) < 1e-3
  assert 'Training the fashion_mnist feature classifier' not in ext.stderr  # The cache of the run above.
  for args, message in [(['--crop=2'], 'give either --workdir=DIR'),
                        ([f'--samples={tmp_path}/ext.npz'], '--crop=2 cuts the 2-pixel border'),
                        ([f'--samples={tmp_path}/ext.npz', '--crop=2', '--steps=1'], '--steps is for a workdir'),
                        ([f'--workdir={tmp_path}/run', '--dataset=mnist'], '--dataset goes with --samples'),
                        ([f'--samples={tmp_path}/ext.npz', '--crop=2', '--eval_config=nope'],
                         '--eval_config=nope: not a config of cm_jax/configs')]:
    bad = run_module('cm_jax.evaluate', *args)
    assert bad.returncode == 2, (args, bad.stderr[-2000:])
    assert message in bad.stderr.strip().splitlines()[-1], (args, bad.stderr[-2000:])


@pytest.fixture
def fast_compiles():
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def test_sample_fn_takes_the_times_as_an_argument(fast_compiles):
  """make_sample_fn traces the intermediate times: the samples of times baked in, without recompiling."""
  config = test_config.get_config()
  denoiser = denoiser_lib.make_denoiser(config)
  shape = (2, 28, 28, 1)
  params = denoiser.model.init(jax.random.PRNGKey(0), np.zeros(shape, np.float32), np.zeros(2, np.float32))['params']
  keys = sampling.example_keys(jax.random.PRNGKey(1), 0, 2)
  sample = samplers.make_sample_fn(denoiser)
  spec = samplers.make_sampler(config, 'consistency', 2, (0.5,))
  first = np.asarray(sample(params, keys, spec, shape))
  baked = jax.jit(lambda p, k: samplers.sample_from_keys(denoiser, p, k, shape, spec))
  np.testing.assert_allclose(first, np.asarray(baked(params, keys)), atol=2e-5)
  traced = []
  listener = lambda event, *_a, **_k: traced.append(event) if 'jaxpr_trace' in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = np.asarray(sample(params, keys, samplers.make_sampler(config, 'consistency', 2, (2.0,)), shape))
    assert not traced  # Another time: the same program, not even traced again.
    sample(params, keys, samplers.make_sampler(config, 'consistency', 3, (2.0, 0.5)), shape)
    assert traced  # Another step count is another program (and the listener sees it).
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert np.abs(first - other).max() > 1e-3


def test_reference_rows_spread_over_the_split():
  np.testing.assert_array_equal(evaluator.reference_indices(5, 0), np.arange(5))
  np.testing.assert_array_equal(evaluator.reference_indices(10, 4), [0, 2, 5, 7])
  rows = evaluator.reference_indices(1000, 10)  # A class-sorted folder of 10 classes x 100: one row per class.
  np.testing.assert_array_equal(rows // 100, np.arange(10))
  with pytest.raises(ValueError, match='exceeds the 5 images'):
    evaluator.reference_indices(5, 6)


def test_data_protocol_states_shape_and_preprocessing():
  """What a paper must state about the images, without reading any data."""
  config = test_config.get_config()
  config.data.name, config.data.pad_to = 'fashion_mnist', 32
  assert evaluator.data_protocol(config.data)['preprocessing'] == 'zero-padded from 28x28 to 32x32'
  config.data.name, config.data.pad_to = 'cifar10', 0
  out = evaluator.data_protocol(config.data)
  assert out['image_shape'] == [32, 32, 3] and out['preprocessing'] == 'none (32x32 as stored)'
  config.data.name, config.data.tfds_config = 'imagenette', '320px-v2'
  out = evaluator.data_protocol(config.data)
  assert out['image_shape'] == [64, 64, 3] and out['tfds_config'] == '320px-v2'
  assert out['preprocessing'].startswith('centre crop to a square') and '64x64' in out['preprocessing']
