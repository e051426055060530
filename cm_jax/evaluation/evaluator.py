r"""Sample quality as a library: feature networks, cached reference features, the Evaluator, and
`score_samplers`, which samples and scores a list of samplers for the evaluate CLI (cm_jax/evaluate.py) and for
in-training evaluation alike.

Evaluator.run(images) yields the scores as (name, value): the Frechet distance to the reference features, the
Inception Score of the feature network's softmax, improved precision and recall (k-NN, k = evaluation.pr_k) and,
with the classifier feature network, the class balance. Nothing here imports a CLI module or cm_jax.inference:
sampling functions and models are passed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from cm_jax import input_pipeline
from cm_jax import samplers
from cm_jax.data import catalog
from cm_jax.evaluation import classifier as classifier_lib
from cm_jax.evaluation import metrics
from cm_jax.evaluation import two_step_search
from cm_jax.runtime import device_map
from cm_jax.runtime import multihost
from cm_jax.runtime import paths
from cm_jax.runtime import progress as progress_lib
from cm_jax.runtime import sharding

MNIST_FAMILY = input_pipeline.MNIST_FAMILY
REFERENCE_FORMAT = 1  # Bump when feature extraction changes: it invalidates cached reference features.
FEATURE_NETS = ('auto', 'classifier', 'inception')
# The keys of a score_samplers result that describe the sampler and its timing; the others are scores.
SAMPLER_FIELDS = ('sampler', 'steps', 'times', 'start_t', 'description', 'sampling_seconds')


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
    return tuple(device_map.map_batches(lambda start, x: fn(x), [images_BHWC], len(images_BHWC), batch_size,
                                        pad_last=False, progress_label=label))
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


def reference_split(config: ml_collections.ConfigDict) -> str:
  """evaluation.reference_split with 'auto' resolved: 'train' for an image folder (its only split), else 'test'."""
  split = config.evaluation.reference_split
  if split != 'auto':
    return split
  return 'train' if config.data.name == 'image_folder' else 'test'


def load_reference(config: ml_collections.ConfigDict, net: FeatureNet) -> Reference:
  """Reference features of evaluation.reference_split (evaluation.num_reference images spread evenly over it,
  or all of it), cached. Streamed datasets (data.storage = 'stream') read only those rows."""
  ev = config.evaluation
  split = reference_split(config)
  data = input_pipeline.load_dataset(config.data, split)
  rows = reference_indices(data.num_examples, ev.num_reference)
  chunk = 10_000
  images = np.concatenate([data.get(rows[i:i + chunk])[0] for i in range(0, len(rows), chunk)])
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
  path = os.path.join(classifier_lib.cache_dir(config), 'reference',
                      f'{config.data.name}_{split}_{len(images)}_{digest}_{net.kind}_{net.cache_id}'
                      f'_v{REFERENCE_FORMAT}.npz')
  info = dict(data_protocol(config.data), split=split, num=int(len(images)), cache_file=path)
  if paths.exists(path):  # Local or gs:// caches.
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      features = f['features']
    logging.info('Loaded cached reference features %s.', path)
  else:
    logging.info('Computing reference features of %d %s images (cached afterwards in %s).', len(images),
                 split, path)
    features, _ = (net.local_fn or net.fn)(images)  # This process alone (process 0 first: see below).
    features = features.astype(np.float32)
    paths.write_file(path, lambda f: np.savez(f, features=features))
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

  def run(self, images_BHWC: np.ndarray) -> Iterator[tuple[str, Any]]:
    """The scores of uint8 images (N >= 2), as (name, value): fd_key, score_key, score_key + '_std', 'precision',
    'recall', 'precision_recall_k' and, with a classifier, 'class_fractions' and 'class_balance_tv'."""
    if len(images_BHWC) < 2:
      raise ValueError(f'Scoring needs at least 2 images, got {len(images_BHWC)}.')
    features, probs = self.net.fn(images_BHWC)
    stats = metrics.FeatureStats.from_features(features)
    ref = self.reference.stats
    yield self.net.fd_key, metrics.frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    score, score_std = metrics.inception_score(probs, splits=min(10, len(images_BHWC)))
    yield self.net.score_key, score
    yield self.net.score_key + '_std', score_std
    k = min(self.pr_k, len(images_BHWC) - 1, len(self.reference.features) - 1)
    yield from metrics.precision_recall(self.reference.features, features, k=k).items()
    yield 'precision_recall_k', k  # evaluation.pr_k, lowered only when there are fewer than k + 1 samples.
    if self.net.kind == 'classifier':  # Inception's 1008 ImageNet classes say nothing about these datasets.
      fractions = class_fractions(probs)
      yield 'class_fractions', [round(float(f), 4) for f in fractions]
      yield 'class_balance_tv', class_balance_tv(fractions)

  def score(self, images_BHWC: np.ndarray) -> dict:
    """dict(run(images)): the scores of the images by name."""
    return dict(self.run(images_BHWC))

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
  h, w, c = catalog.image_shape(data_config)
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


def sampler_key(spec: samplers.Sampler) -> str:
  """A short name for metric tags: '1step', '2step', 'heun18'."""
  return f'{spec.steps}step' if spec.name == 'consistency' else f'{spec.name}{spec.steps}'


def score_samplers(sample: Callable[[samplers.Sampler, int], np.ndarray], evaluator: Evaluator,
                   specs: Sequence[samplers.Sampler], num: int) -> list[dict]:
  """Samples `num` uint8 images (N, H, W, C) with each sampler (sample(spec, num)) and scores them; per sampler
  in order, {'sampler', 'steps', 'times', 'start_t' (consistency samplers: spec.first_time), 'description',
  'sampling_seconds'} and the evaluator's scores, as the evaluate CLI's JSON `results`."""
  results = []
  for spec in specs:
    t0 = time.time()
    samples = sample(spec, num)
    t1 = time.time()
    scores = evaluator.score(samples)
    logging.info('%s: %s (%.0f s sampling, %.0f s scoring)', spec.describe(),
                 ', '.join(f'{k} {v:.4f}' for k, v in scores.items() if np.isscalar(v)), t1 - t0,
                 time.time() - t1)
    start = {} if spec.name != 'consistency' else {'start_t': spec.first_time}
    results.append(dict(sampler=spec.name, steps=spec.steps, times=list(spec.times), **start,
                        description=spec.describe(), sampling_seconds=round(t1 - t0, 2), **scores))
  return results


def scalar_scores(result: dict) -> dict:
  """The scores of a score_samplers result that are metrics to plot: scalars, without the sampler fields and
  precision_recall_k (class_fractions, a list, is for the JSON report only)."""
  return {k: v for k, v in result.items()
          if k not in SAMPLER_FIELDS and k != 'precision_recall_k' and np.isscalar(v)}


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


def evaluate(model: Any, evaluator: Evaluator, specs: Sequence[samplers.Sampler], num: int, seed: int = 0,
             batch_size: int = 256, search_points: int = 0, search_num: int = 0, memorization_num: int = 0) -> dict:
  """The evaluate CLI's JSON object for a loaded model (an inference.LoadedModel): the scores of each sampler,
  the protocol, and optionally the two-step search (search_points > 0) and the memorisation check."""
  kept = []  # The first sampler's samples, for the memorisation check.

  def sample(spec: samplers.Sampler, n: int) -> np.ndarray:
    images = model.sample(n, steps=spec.steps, ts=spec.times or None, seed=seed, batch_size=batch_size,
                          sampler=spec.name)
    if memorization_num and not kept:
      kept.append(images[:memorization_num])
    return images

  results = score_samplers(sample, evaluator, specs, num)
  protocol = dict(evaluator.protocol(num), sampling_seed=seed)
  if model.num_classes:
    protocol['class_labels'] = (f'drawn uniformly from the {model.num_classes} classes (label i from (seed, i), '
                                'cm_jax.samplers.draw_labels)')
  out = {'workdir': paths.absolute(model.workdir), 'checkpoint_step': model.step,
         'params': model.which_params, 'dataset': model.config.data.name, 'seed': seed,
         'protocol': protocol, 'results': results}
  if search_points:
    if model.is_diffusion_model:
      raise ValueError('--search_two_step is for consistency models; this run is an EDM diffusion model.')
    n = search_num or num

    def score_at_time(t: float) -> dict:
      return evaluator.score(model.sample(n, steps=2, ts=(t,), seed=seed, batch_size=batch_size))

    out['two_step_search'] = dict(two_step_search.search_two_step_time(score_at_time, evaluator.fd_key,
                                                                       model.config, search_points), num_samples=n)
  if memorization_num:
    out['memorization'] = memorization_check(model.config, kept[0], memorization_num)
  return out


def evaluate_samples(evaluator: Evaluator, images_BHWC: np.ndarray, samples_path: str, dataset: str) -> dict:
  """The evaluate CLI's JSON object for images made elsewhere (another codebase's samples)."""
  return {'samples_file': paths.absolute(samples_path), 'dataset': dataset,
          'protocol': evaluator.protocol(len(images_BHWC)),
          'results': [dict(sampler='external', num=int(len(images_BHWC)), **evaluator.score(images_BHWC))]}
