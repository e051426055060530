r"""Sample quality: python -m cm_jax.evaluate --workdir=DIR --num=10000 --steps=1,2
                  python -m cm_jax.evaluate --samples=FILE.npz --dataset=fashion_mnist [--crop=2]

Prints ONE JSON object on stdout (logs go to stderr): for each sampler, the Frechet distance to the reference
features, the Inception Score of the feature network's softmax, improved precision and recall (k-NN, k =
evaluation.pr_k), and the protocol (sample count, seed, reference split and size, feature network, resize).
With the classifier feature network also the class balance: `class_fractions` (the share of samples the
classifier puts in each class) and `class_balance_tv` (their total variation distance to uniform; 0 = every
class equally often). --samples scores images made elsewhere (uint8 NHWC in an .npz, e.g. the PyTorch
reference's) against --dataset's reference set, with the same feature network and cache.

Feature networks (config.evaluation.feature_net, or --feature_net):
  * 'inception': the 2015-12-05 Inception graph of published FIDs (cm_jax/evaluation/inception.py); keys 'fid' and
    'inception_score'. Published CIFAR-10 FIDs use 50,000 samples against the 50,000 train images.
  * 'classifier' (the default for the MNIST family): a small CNN cm_jax trains once on the train split and
    caches (cm_jax/evaluation/classifier.py); keys 'classifier_fd' and 'classifier_score'. NOT comparable to Inception FIDs.
Reference features are computed once per (dataset, split, size, feature network) and cached under
CACHE_DIR/reference/.

--search_two_step: ternary search of the intermediate time of two-step sampling over the interior of a
--search_points Karras grid (as the official CM code: CIFAR-10 CD picks index 11 of 18, sigma = 0.585),
minimising the Frechet distance with the same noise at every candidate; reports the chosen time.
--memorization: pixel distance of samples to their nearest training image, against the same for held-out
images (cm_jax.evaluation.metrics.memorization).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from cm_jax.runtime import atomic_file
from cm_jax.evaluation import classifier as classifier_lib
from cm_jax.runtime import cli
from cm_jax import config_validation
from cm_jax.runtime import errors
from cm_jax import inference
from cm_jax import input_pipeline
from cm_jax.core import karras
from cm_jax.evaluation import metrics
from cm_jax.runtime import multihost
from cm_jax.runtime import paths
from cm_jax.runtime import progress as progress_lib
from cm_jax.runtime import sharding

MNIST_FAMILY = input_pipeline.MNIST_FAMILY
REFERENCE_FORMAT = 1  # Bump when feature extraction changes: it invalidates cached reference features.
FEATURE_NETS = ('auto', 'classifier', 'inception')


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network: images uint8 (N, H, W, C) -> (features (N, D), class probabilities (N, K)).

  fn splits the images over every device of every process (a collective: in a multi-process run every
  process calls it with the same images, and each gets all the features); local_fn computes them with this
  process alone (for work done by one process, such as the cached reference features); None: fn is local.
  """
  kind: str  # 'classifier' | 'inception'
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  cache_id: str  # Changes whenever the features would.
  protocol: dict
  local_fn: Optional[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = None

  @property
  def fd_key(self) -> str:
    return 'fid' if self.kind == 'inception' else 'classifier_fd'

  @property
  def score_key(self) -> str:
    return 'inception_score' if self.kind == 'inception' else 'classifier_score'


def feature_net_kind(config: ml_collections.ConfigDict) -> str:
  kind = config.evaluation.feature_net
  if kind not in FEATURE_NETS:
    raise ValueError(f'evaluation.feature_net = {kind!r}; choose one of {FEATURE_NETS}.')
  if kind == 'auto':
    return 'classifier' if config.data.name in MNIST_FAMILY else 'inception'
  return kind


def make_feature_net(config: ml_collections.ConfigDict) -> FeatureNet:
  """The feature network config.evaluation names: trains/loads the classifier or loads the Inception graph."""
  ev = config.evaluation
  kind = feature_net_kind(config)
  if kind == 'classifier':
    if config.data.name not in MNIST_FAMILY:
      raise ValueError(f"evaluation.feature_net = 'classifier' is for {MNIST_FAMILY}, not {config.data.name!r}; "
                       "use 'inception'.")
    net = classifier_lib.load_or_train(config)
    # fn scores samples (Evaluator.score); local_fn computes the reference features (load_reference).
    return FeatureNet('classifier', lambda x: net(x, ev.batch_size, devices=jax.devices(),
                                                  progress_label='Sample features (classifier)'),
                      net.cache_id, net.protocol(),
                      local_fn=lambda x: net(x, ev.batch_size, devices=jax.local_devices(),
                                             progress_label='Reference features (classifier)'))
  from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top  (TensorFlow only when needed)
  path = inception.resolve_weights(ev.inception_path, classifier_lib.cache_dir(config))
  net = inception.InceptionNet(path)
  protocol = dict(net.protocol(), comparable_to_published_fid=True,
                  note='Published FIDs use 50,000 samples and a fixed reference set (CIFAR-10: the 50,000 '
                       'train images); other sample counts or splits shift the numbers.')
  batch = min(ev.batch_size, 100)
  local_fn = lambda x: net(x, batch)  # TensorFlow on this host's CPU.
  samples_fn = batches_with_progress(local_fn, batch, 'Sample features (Inception)')
  return FeatureNet('inception', lambda x: sharding.split_over_processes(samples_fn, x),
                    protocol['graph_sha256'][:16], protocol,
                    local_fn=batches_with_progress(local_fn, batch, 'Reference features (Inception)'))


def batches_with_progress(fn: Callable[[np.ndarray], tuple[np.ndarray, ...]], batch_size: int,
                          label: str) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
  """fn (a per-row feature function that batches by batch_size itself, as InceptionNet) called one batch at a
  time, so that process 0 can log progress between batches. The batches are those fn would make, so the
  features are the same; the rows of fn's outputs are concatenated."""
  def run(images_BHWC: np.ndarray) -> tuple[np.ndarray, ...]:
    if not len(images_BHWC):
      return fn(images_BHWC)
    progress = progress_lib.Progress(label, total=len(images_BHWC), unit='images',
                                     enabled=jax.process_index() == 0)
    parts = []
    for start in range(0, len(images_BHWC), batch_size):
      parts.append(fn(images_BHWC[start:start + batch_size]))
      progress.update(len(parts[-1][0]))
    progress.done()
    return tuple(np.concatenate(outputs) for outputs in zip(*parts))
  return run


@dataclasses.dataclass(frozen=True)
class Reference:
  """Features of the reference images and their statistics."""
  features: np.ndarray
  stats: metrics.FeatureStats
  info: dict  # dataset, split, num, pad_to, cache file.


def reference_indices(num_examples: int, num: int) -> np.ndarray:
  """The rows of the reference split to use: all (num = 0), else num rows spread evenly over the split (every
  (num_examples / num)-th), so that a split sorted by class, such as an image folder, is represented whole."""
  if not num:
    return np.arange(num_examples, dtype=np.int64)
  if num > num_examples:
    raise ValueError(f'evaluation.num_reference = {num} exceeds the {num_examples} images of the split.')
  return np.arange(num, dtype=np.int64) * num_examples // num


def load_reference(config: ml_collections.ConfigDict, net: FeatureNet) -> Reference:
  """Reference features of evaluation.reference_split (evaluation.num_reference images spread evenly over it,
  or all of it), cached. Streamed datasets (data.storage = 'stream') read only those rows."""
  ev = config.evaluation
  data = input_pipeline.load_dataset(config.data, ev.reference_split)
  rows = reference_indices(data.num_examples, ev.num_reference)
  chunk = 10_000
  images = np.concatenate([data.get(rows[i:i + chunk])[0] for i in range(0, len(rows), chunk)])
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
  path = os.path.join(classifier_lib.cache_dir(config), 'reference',
                      f'{config.data.name}_{ev.reference_split}_{len(images)}_{digest}_{net.kind}_{net.cache_id}'
                      f'_v{REFERENCE_FORMAT}.npz')
  info = dict(data_protocol(config.data), split=ev.reference_split, num=int(len(images)), cache_file=path)
  if paths.exists(path):  # Local or gs:// caches.
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      features = f['features']
    logging.info('Loaded cached reference features %s.', path)
  else:
    logging.info('Computing reference features of %d %s images (cached afterwards in %s).', len(images),
                 ev.reference_split, path)
    features, _ = (net.local_fn or net.fn)(images)  # This process alone (process 0 first: see below).
    features = features.astype(np.float32)
    atomic_file.write_atomic(path, lambda f: np.savez(f, features=features))
  return Reference(features, metrics.FeatureStats.from_features(features), info)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Scores uint8 images against a reference set in a feature network's space."""
  net: FeatureNet
  reference: Reference
  pr_k: int

  @property
  def fd_key(self) -> str:
    return self.net.fd_key

  def score(self, images_BHWC: np.ndarray) -> dict:
    """{fd_key, score_key, score_key + '_std', 'precision', 'recall', 'precision_recall_k'} of the images."""
    if len(images_BHWC) < 2:
      raise ValueError(f'Scoring needs at least 2 images, got {len(images_BHWC)}.')
    features, probs = self.net.fn(images_BHWC)
    stats = metrics.FeatureStats.from_features(features)
    ref = self.reference.stats
    out = {self.net.fd_key: metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)}
    out[self.net.score_key], out[self.net.score_key + '_std'] = metrics.inception_score(
        probs, splits=min(10, len(images_BHWC)))
    k = min(self.pr_k, len(images_BHWC) - 1, len(self.reference.features) - 1)
    out.update(metrics.precision_recall(self.reference.features, features, k=k))
    out['precision_recall_k'] = k  # evaluation.pr_k, lowered only when there are fewer than k + 1 samples.
    if self.net.kind == 'classifier':  # Inception's 1008 ImageNet classes say nothing about these datasets.
      fractions = class_fractions(probs)
      out['class_fractions'] = [round(float(f), 4) for f in fractions]
      out['class_balance_tv'] = class_balance_tv(fractions)
    return out

  def protocol(self, num_samples: int) -> dict:
    return {'num_samples': int(num_samples), 'reference': self.reference.info, 'feature_net': self.net.protocol,
            'precision_recall_k': self.pr_k,
            'resize': self.net.protocol.get('input', 'none: images at the model resolution')}


def class_fractions(probs_NK: np.ndarray) -> np.ndarray:
  """The fraction of the samples the feature classifier assigns to each class (argmax), shape (K,)."""
  probs_NK = np.asarray(probs_NK)
  return np.bincount(np.argmax(probs_NK, axis=1), minlength=probs_NK.shape[1]) / len(probs_NK)


def class_balance_tv(fractions_K: np.ndarray) -> float:
  """Total variation distance between the class fractions and the uniform distribution: 0 when every class is
  produced equally often, 1 - 1/K when one class takes every sample. The reference is uniform because the
  test splits scored here are balanced (the MNIST family: 1,000 per class)."""
  fractions_K = np.asarray(fractions_K, np.float64)
  return float(0.5 * np.abs(fractions_K - 1.0 / len(fractions_K)).sum())


def data_protocol(data_config: ml_collections.ConfigDict) -> dict:
  """What a paper states about the images: dataset (and TFDS config or class map), shape and preprocessing."""
  h, w, c = input_pipeline.image_shape(data_config)
  if data_config.name in MNIST_FAMILY:
    prep = f'zero-padded from 28x28 to {h}x{w}' if data_config.pad_to else 'none (28x28 as stored)'
  elif data_config.name == 'cifar10' and h == 32:
    prep = 'none (32x32 as stored)'
  elif data_config.name == 'imagenet64' and h == 64:
    prep = ('none: TFDS imagenet_resized/64x64 as stored (Chrabaszcz et al. 2017: whole images box-resized to '
            '64x64, no centre crop; not the ImageNet 64x64 of ADM, EDM and CM)')
  else:
    prep = (f'centre crop to a square (the short side), then resized to {h}x{w} (area averaging down, bicubic '
            'up)')
  out = {'dataset': data_config.name, 'image_shape': [h, w, c], 'preprocessing': prep,
         'pad_to': int(data_config.pad_to or 0)}
  for field in ('tfds_config', 'class_map', 'manual_dir'):
    if data_config.get(field):
      out[field] = data_config[field]
  return out


def make_evaluator(config: ml_collections.ConfigDict) -> Evaluator:
  net = make_feature_net(config)
  return Evaluator(net, load_reference(config, net), int(config.evaluation.pr_k))


def make_evaluator_on_all_processes(config: ml_collections.ConfigDict) -> Evaluator:
  """make_evaluator, process 0 first: it trains/caches the classifier and reference features while the
  others wait at a barrier, then load them from the cache (on a shared filesystem; else they compute their
  own, identically seeded)."""
  return multihost.process_zero_first(lambda: make_evaluator(config), 'cm_jax_evaluator_cached')


def sampler_key(spec: inference.Sampler) -> str:
  """A short name for metric tags: '1step', '2step', 'heun18'."""
  return f'{spec.steps}step' if spec.name == 'consistency' else f'{spec.name}{spec.steps}'


def ternary_search(metric_at: Callable[[int], float], lo: int, hi: int) -> int:
  """Integer argmin of a unimodal metric on [lo, hi]: thirds until < 4 candidates remain, then all of them.

  metric_at is called once per index at most if it memoises (see `search_two_step_time`).
  """
  if lo > hi:
    raise ValueError(f'Empty search range [{lo}, {hi}].')
  while hi - lo >= 3:
    m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
    if metric_at(m1) < metric_at(m2):
      hi = m2 - 1  # The minimum of a unimodal function is left of m2.
    else:
      lo = m1 + 1
  return min(range(lo, hi + 1), key=metric_at)


def max_ternary_evaluations(lo: int, hi: int) -> int:
  """The most distinct indices `ternary_search` evaluates on [lo, hi], over every outcome of its comparisons
  (the count depends on them: 6 to 8 on [1, 16]); the two-step search's progress counts towards it."""
  @functools.lru_cache(maxsize=None)
  def most_new(size: int, seen: frozenset) -> int:  # On [0, size - 1], `seen` evaluated already (memoised).
    if size < 4:
      return size - len(seen)
    m1, m2 = (size - 1) // 3, size - 1 - (size - 1) // 3
    new = len({m1, m2} - seen)
    seen = seen | {m1, m2}
    left = frozenset(i for i in seen if i <= m2 - 1)
    right = frozenset(i - m1 - 1 for i in seen if i >= m1 + 1)
    return new + max(most_new(m2, left), most_new(size - m1 - 1, right))
  return most_new(hi - lo + 1, frozenset()) if lo <= hi else 0


def search_two_step_time(score_at_time: Callable[[float], dict], fd_key: str,
                         config: ml_collections.ConfigDict, points: int) -> dict:
  """Ternary search of two-step sampling's intermediate time over the interior of a `points` Karras grid
  (the points below sampling.start_t when that is set)."""
  cc = config.consistency
  if points < 3:
    raise ValueError(f'--search_points must be >= 3 (a grid with an interior), got {points}.')
  grid = np.asarray(karras.karras_grid(points, cc.sigma_min, cc.sigma_max, cc.rho), np.float64)[::-1]  # Descending.
  first = inference.start_time(config)
  lo = next((i for i in range(1, points - 1) if grid[i] < first), None)
  if lo is None:
    raise ValueError(f'No point of the {points}-point grid lies below sampling.start_t = {first:g}; raise '
                     '--search_points.')
  evaluated: dict[int, dict] = {}
  # Each candidate samples and scores a full set (minutes): progress counts them towards the most the search
  # can need, an upper bound, as is the ETA (the search may stop sooner).
  progress = progress_lib.Progress('Two-step search', total=max_ternary_evaluations(lo, points - 2),
                                   unit='candidates', total_is_upper_bound=True, enabled=jax.process_index() == 0)

  def metric_at(index: int) -> float:
    if index not in evaluated:
      t = float(grid[index])
      evaluated[index] = dict(index=index, t=t, **score_at_time(t))
      logging.info('Two-step search: grid index %d (t = %.4f): %s = %.4f', index, t, fd_key,
                   evaluated[index][fd_key])
      progress.update(1)
    return evaluated[index][fd_key]

  best = ternary_search(metric_at, lo, points - 2)
  progress.done()
  return {'grid_points': points, 'grid': 'Karras, descending (index 0 = sigma_max)', 'metric': fd_key,
          'best_index': best, 'best_t': evaluated[best]['t'], 'best': evaluated[best],
          'evaluated': [evaluated[i] for i in sorted(evaluated)]}


def memorization_check(config: ml_collections.ConfigDict, samples_BHWC: np.ndarray, num_heldout: int) -> dict:
  """Nearest-train-image pixel distances of samples vs held-out (test) images ([0, 1] pixels, L2)."""
  train = input_pipeline.load_images(config.data, 'train')
  heldout = input_pipeline.load_images(config.data, 'test')[:num_heldout]
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  progress = progress_lib.Progress('Memorisation check (nearest training images)',
                                   total=len(samples_BHWC) + len(heldout), unit='images',
                                   enabled=jax.process_index() == 0)
  report = metrics.memorization(flat(samples_BHWC), flat(train), flat(heldout), on_rows=progress.update)
  progress.done()
  return dict(report, space='pixels in [0, 1], Euclidean', num_samples=int(len(samples_BHWC)),
              num_train=int(len(train)), num_heldout=int(len(heldout)))


def evaluate(model: inference.LoadedModel, evaluator: Evaluator, samplers: Sequence[inference.Sampler],
             num: int, seed: int = 0, batch_size: int = 256, search_points: int = 0, search_num: int = 0,
             memorization_num: int = 0) -> dict:
  """The evaluate CLI's JSON object for a loaded model (see the module docstring)."""
  results, first_samples = [], None
  for spec in samplers:
    t0 = time.time()
    samples = model.sample(num, steps=spec.steps, ts=spec.times or None, seed=seed, batch_size=batch_size,
                           sampler=spec.name)
    t1 = time.time()
    scores = evaluator.score(samples)
    logging.info('%s: %s (%.0f s sampling, %.0f s scoring)', spec.describe(),
                 ', '.join(f'{k} {v:.4f}' for k, v in scores.items() if np.isscalar(v)), t1 - t0,
                 time.time() - t1)
    start = {} if spec.name != 'consistency' else {
        'start_t': model.config.consistency.sigma_max if spec.start_t is None else spec.start_t}
    results.append(dict(sampler=spec.name, steps=spec.steps, times=list(spec.times), **start,
                        description=spec.describe(), sampling_seconds=round(t1 - t0, 2), **scores))
    if first_samples is None:
      first_samples = samples
  protocol = dict(evaluator.protocol(num), sampling_seed=seed)
  if model.num_classes:
    protocol['class_labels'] = (f'drawn uniformly from the {model.num_classes} classes (label i from (seed, i), '
                                'cm_jax.inference.draw_labels)')
  out = {'workdir': paths.absolute(model.workdir), 'checkpoint_step': model.step,
         'params': model.which_params, 'dataset': model.config.data.name, 'seed': seed,
         'protocol': protocol, 'results': results}
  if search_points:
    if model.is_diffusion_model:
      raise ValueError('--search_two_step is for consistency models; this run is an EDM diffusion model.')
    n = search_num or num

    def score_at_time(t: float) -> dict:
      return evaluator.score(model.sample(n, steps=2, ts=(t,), seed=seed, batch_size=batch_size))

    out['two_step_search'] = dict(search_two_step_time(score_at_time, evaluator.fd_key, model.config,
                                                       search_points), num_samples=n)
  if memorization_num:
    out['memorization'] = memorization_check(model.config, first_samples[:memorization_num], memorization_num)
  return out


def load_samples_file(path: str, image_shape: Sequence[int], crop: int = 0,
                      num: Optional[int] = None) -> np.ndarray:
  """uint8 (N, H, W, C) images from an .npz file (its one array, or 'arr_0' or 'samples' among several), with
  `crop` pixels cut from each border, checked against the dataset's image_shape; the first `num` of them."""
  try:
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      names = list(f.keys())
      key = names[0] if len(names) == 1 else next((k for k in ('arr_0', 'samples') if k in names), None)
      if key is None:
        raise errors.InputFileError(f'--samples {path}: holds arrays {names}; expected one array, or one named '
                                    "'arr_0' or 'samples'.")
      images = f[key]
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.InputFileError(f'--samples {path}: not a readable .npz file ({e}).') from e
  if images.dtype != np.uint8 or images.ndim != 4:
    raise errors.InputFileError(f'--samples {path}: expected uint8 images (N, H, W, C), got {images.dtype} '
                                f'{images.shape}.')
  if crop:
    if 2 * crop >= min(images.shape[1:3]):
      raise errors.UsageError(f'--crop={crop} leaves nothing of {images.shape[1]}x{images.shape[2]} images.')
    images = images[:, crop:-crop, crop:-crop, :]
  if tuple(images.shape[1:]) != tuple(image_shape):
    h, w = images.shape[1] - image_shape[0], images.shape[2] - image_shape[1]
    hint = (f' (--crop={h // 2} cuts the {h // 2}-pixel border)' if h == w and h > 0 and h % 2 == 0 and
            images.shape[3] == image_shape[2] else '')
    raise errors.UsageError(f'--samples {path}: images of shape {tuple(images.shape[1:])} after --crop={crop}; '
                            f'the dataset\'s are {tuple(image_shape)}{hint}.')
  if num is not None:
    if num > len(images):
      raise errors.UsageError(f'--num={num}, but --samples {path} holds {len(images)} images.')
    images = images[:num]
  return np.ascontiguousarray(images)


def evaluate_samples(evaluator: Evaluator, images_BHWC: np.ndarray, samples_path: str, dataset: str) -> dict:
  """The evaluate CLI's JSON object for images made elsewhere (another codebase's samples)."""
  return {'samples_file': paths.absolute(samples_path), 'dataset': dataset,
          'protocol': evaluator.protocol(len(images_BHWC)),
          'results': [dict(sampler='external', num=int(len(images_BHWC)), **evaluator.score(images_BHWC))]}


def eval_config(name: str) -> ml_collections.ConfigDict:
  """get_config() of the config module cm_jax.configs.NAME (its evaluation group scores --samples)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  from cm_jax import configs  # pylint: disable=g-import-not-at-top
  names = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))
  if name not in names:
    raise errors.UsageError(f'--eval_config={name}: not a config of cm_jax/configs; choose one of '
                            f'{", ".join(names)}.')
  return importlib.import_module(f'cm_jax.configs.{name}').get_config()


def external_samples_main() -> None:
  """evaluate --samples=FILE.npz --dataset=NAME: scores another model's samples with cm_jax's evaluation."""
  for name in ('steps', 'sampler', 'ts', 'start_t', 'ema', 'checkpoint_step', 'search_two_step', 'memorization',
               'seed'):
    if FLAGS[name].present:
      raise errors.UsageError(f'--{name} is for a workdir\'s model; --samples scores images as they are.')
  if FLAGS.crop < 0:
    raise errors.UsageError(f'--crop must be >= 0, got {FLAGS.crop}.')
  config = eval_config(FLAGS.eval_config)
  config.data.name = FLAGS.dataset
  for key in ('feature_net', 'inception_path', 'cache_dir', 'reference_split', 'num_reference'):
    if FLAGS[key].value is not None:
      config.evaluation[key] = FLAGS[key].value
  try:
    config_validation.validate(config)
  except ValueError as e:
    raise errors.UsageError(f'--dataset={FLAGS.dataset}: {e}') from e
  if FLAGS.output and jax.process_index() == 0:
    cli.check_writable_file(FLAGS.output, '--output')
  images = load_samples_file(FLAGS.samples, input_pipeline.image_shape(config.data), FLAGS.crop,
                             FLAGS.num if FLAGS['num'].present else None)
  out = evaluate_samples(make_evaluator_on_all_processes(config), images, FLAGS.samples, FLAGS.dataset)
  text = json.dumps(out, indent=1)
  if jax.process_index() == 0:
    if FLAGS.output:
      paths.write_file(FLAGS.output, lambda f: f.write((text + '\n').encode()))
    sys.stdout.write(text + '\n')


FLAGS = flags.FLAGS


def define_flags() -> None:
  multihost.define_flags()
  flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/ (or --samples instead).')
  flags.DEFINE_string('samples', None, 'Instead of --workdir: an .npz of uint8 NHWC images made elsewhere (e.g. '
                      'the PyTorch reference\'s edm_heun18.npz), scored as they are against --dataset.')
  flags.DEFINE_string('dataset', 'fashion_mnist', 'With --samples: the dataset whose reference set they are '
                      'scored against (config.data.name).')
  flags.DEFINE_string('eval_config', 'default', 'With --samples: the config (a module of cm_jax/configs) whose '
                      'evaluation settings (feature classifier, reference set) score them.')
  flags.DEFINE_integer('crop', 0, 'With --samples: pixels cut from each border first (2 turns the reference\'s '
                       '32x32 into 28x28).')
  flags.DEFINE_integer('num', 10_000, 'Samples per sampler (published FIDs: 50000).')
  flags.DEFINE_list('steps', None, 'Sampling steps to evaluate, e.g. 1,2 (default: 1,2 for consistency models, '
                    'config.sampling.diffusion_steps for EDM models).')
  flags.DEFINE_enum('sampler', None, ['consistency', 'heun', 'euler'], 'Default: the model\'s own.')
  flags.DEFINE_list('ts', None, 'Intermediate times, for a single --steps value > 1 (default: the config\'s).')
  flags.DEFINE_float('start_t', None, 'Consistency sampling\'s first time, in (sigma_min, sigma_max] (default: '
                     'the run\'s sampling.start_t, else sigma_max).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('batch_size', 256, 'Samples per device call.')
  flags.DEFINE_string('ema', None, "Sampling EMA rate (default: the run's first), or 'online'.")
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_enum('feature_net', None, list(FEATURE_NETS), 'Default: the run\'s evaluation.feature_net.')
  flags.DEFINE_string('inception_path', None, 'classify_image_graph_def.pb or inception-2015-12-05.tgz.')
  flags.DEFINE_string('cache_dir', None, 'Cache of classifiers and reference features (default: '
                      'evaluation.cache_dir, $CM_JAX_CACHE or ~/.cache/cm_jax).')
  flags.DEFINE_string('reference_split', None, 'Reference split (default: evaluation.reference_split).')
  flags.DEFINE_integer('num_reference', None, 'Reference images, 0 = all (default: evaluation.num_reference).')
  flags.DEFINE_bool('search_two_step', False, 'Ternary-search the two-step intermediate time.')
  flags.DEFINE_integer('search_points', 18, 'Karras grid of the search (official CM: 18 on CIFAR-10, 40 on '
                       'ImageNet64).')
  flags.DEFINE_integer('search_num', 0, 'Samples per search candidate (0: --num).')
  flags.DEFINE_integer('memorization', 0, 'Samples (of the first sampler) and held-out images in the '
                       'memorisation check; 0: skip.')
  flags.DEFINE_string('output', None, 'Also write the JSON object to this file.')


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  if (FLAGS.workdir is None) == (FLAGS.samples is None):
    raise errors.UsageError('give either --workdir=DIR (a cm_jax run) or --samples=FILE.npz (images made '
                            'elsewhere), not ' + ('both.' if FLAGS.workdir else 'neither.'))
  if FLAGS.samples is not None:
    if FLAGS.num < 2:
      raise errors.UsageError(f'--num must be >= 2, got {FLAGS.num}.')
    multihost.initialize_from_flags()
    external_samples_main()
    return
  for name in ('dataset', 'crop', 'eval_config'):
    if FLAGS[name].present:
      raise errors.UsageError(f'--{name} goes with --samples; a workdir\'s run knows its dataset.')
  for name, low in (('num', 1), ('batch_size', 1), ('search_num', 0), ('memorization', 0), ('search_points', 3)):
    if FLAGS[name].value < low:
      raise errors.UsageError(f'--{name} must be >= {low}, got {FLAGS[name].value}.')
  if FLAGS.num_reference is not None and FLAGS.num_reference < 0:
    raise errors.UsageError(f'--num_reference must be >= 0 (0: all), got {FLAGS.num_reference}.')
  times = cli.parse_floats('ts', FLAGS.ts)
  step_counts = None if FLAGS.steps is None else cli.parse_ints('steps', FLAGS.steps)
  multihost.initialize_from_flags()  # Before any device use: TPU pods, SLURM, or the explicit flags.
  if FLAGS.output and jax.process_index() == 0:  # Before the sampling, not after it.
    cli.check_writable_file(FLAGS.output, '--output')
  model = inference.load(FLAGS.workdir, step=FLAGS.checkpoint_step, ema=FLAGS.ema)
  config = model.config
  overrides = {'feature_net': FLAGS.feature_net, 'inception_path': FLAGS.inception_path,
               'cache_dir': FLAGS.cache_dir, 'reference_split': FLAGS.reference_split,
               'num_reference': FLAGS.num_reference}
  for key, value in overrides.items():
    if value is not None:
      config.evaluation[key] = value
  config_validation.validate(config)
  try:  # After config_validation: the run's two_step_t need not lie below --start_t unless two steps use it.
    inference.set_start_time(config, FLAGS.start_t)
  except ValueError as e:
    raise errors.UsageError(f'--start_t={FLAGS.start_t:g}: {e}') from e
  if jax.process_index() == 0:  # Classifiers and reference features are cached there.
    cli.check_writable_dir(classifier_lib.cache_dir(config), '--cache_dir' if FLAGS.cache_dir else
                           'the evaluation cache (evaluation.cache_dir, $CM_JAX_CACHE or ~/.cache/cm_jax)')
  cli.check_fits_in_memory(FLAGS.num * int(np.prod(model.image_shape)) * 5, f'--num={FLAGS.num}',
                           'lower --num.')
  try:
    if step_counts is None:
      step_counts = [None] if model.is_diffusion_model else [1, 2]
    if times is not None and len(step_counts) != 1:
      raise errors.UsageError('--ts needs a single --steps value.')
    samplers = [inference.make_sampler(config, FLAGS.sampler, s, times) for s in step_counts]
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  evaluator = make_evaluator_on_all_processes(config)
  out = evaluate(model, evaluator, samplers, FLAGS.num, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                 search_points=FLAGS.search_points if FLAGS.search_two_step else 0, search_num=FLAGS.search_num,
                 memorization_num=FLAGS.memorization)
  text = json.dumps(out, indent=1)
  if jax.process_index() == 0:  # Every process computed the same report; one writes it.
    if FLAGS.output:
      paths.write_file(FLAGS.output, lambda f: f.write((text + '\n').encode()))
    sys.stdout.write(text + '\n')


if __name__ == '__main__':
  cli.run(main, define_flags)
