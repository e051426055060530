"""A feature network of FID-style metrics trained by cm_jax: a small CNN classifier of the dataset's labels.

Inception features of 28x28 grayscale digits mean little (and the Inception weights cannot be had offline),
so for 'mnist' and 'fashion_mnist' (the default there) cm_jax trains a small classifier on the dataset's train
split, once, and caches it under CACHE_DIR/classifier/. Its penultimate layer (`FEATURE_DIM` units) is the
feature space of the Frechet distance; its softmax gives a classifier score (the Inception Score computed with
this network). With evaluation.feature_net = 'classifier' any labelled dataset gets one (RGB image folders,
CIFAR-10, ...): an offline metric where the Inception weights cannot be downloaded. A dataset without a test
split (an image folder) holds out every tenth train image to measure the classifier's accuracy.

These numbers are comparable between cm_jax runs that share the cached classifier (same dataset, padding,
classifier settings and seed: the cache key), and NOT comparable to Inception FIDs in papers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax

from cm_jax import input_pipeline
from cm_jax.runtime import device_map
from cm_jax.runtime import paths
from cm_jax.runtime import progress as progress_lib
from cm_jax.runtime import sharding

FEATURE_DIM = 128
HELD_OUT_EVERY = 10  # Without a test split: every tenth train image measures the accuracy (not trained on).
FORMAT_VERSION = 1  # Bump when the architecture or training recipe changes: it invalidates the caches.


class SmallCNN(nn.Module):
  """conv16 - pool - conv32 - pool - conv64, then a FEATURE_DIM-unit hidden layer: small enough to train in
  minutes on a laptop CPU (the features need not be state of the art, only fixed and informative)."""
  num_classes: int

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (features (B, FEATURE_DIM), logits (B, num_classes)) for images in [-1, 1]."""
    x = nn.relu(nn.Conv(16, (3, 3))(x_BHWC))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(FEATURE_DIM)(x))
    h = nn.Dropout(0.3, deterministic=not train)(features)
    return features, nn.Dense(self.num_classes)(h)


@dataclasses.dataclass
class Classifier:
  """A trained SmallCNN and what it was trained on; call it on uint8 images for (features, probabilities)."""
  params: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  info: dict  # Dataset, split sizes, settings, test accuracy, cache file.

  def _apply(self, mesh: Mesh):
    """The jitted network on `mesh`: images split over its 'data' axis, params replicated."""
    cache = self.__dict__.setdefault('_jitted', {})
    if mesh not in cache:
      model = SmallCNN(self.num_classes)
      batch = sharding.batch_sharding(mesh)

      @functools.partial(jax.jit, in_shardings=(sharding.replicated(mesh), batch),
                         out_shardings=(batch, batch))
      def run(params, images_uint8):
        features, logits = model.apply({'params': params}, input_pipeline.to_model_range(images_uint8))
        return features, jax.nn.softmax(logits)
      cache[mesh] = run
    return cache[mesh]

  def __call__(self, images_BHWC: np.ndarray, batch_size: int = 500,
               devices: Optional[Sequence[jax.Device]] = None,
               progress_label: str = 'Classifier features') -> tuple[np.ndarray, np.ndarray]:
    """(features float64 (N, FEATURE_DIM), class probabilities float64 (N, num_classes)) of uint8 images.

    Each batch (batch_size rounded up to a multiple of the device count) is split over `devices`: by
    default this process's own (jax.local_devices(), no other process involved); jax.devices() splits it
    over every process's devices, a collective that every process calls with the same images. Process 0 logs
    progress as `progress_label` (the evaluator names what is extracted: sample or reference features).
    """
    images_BHWC = np.asarray(images_BHWC)
    if images_BHWC.dtype != np.uint8 or images_BHWC.shape[1:] != self.image_shape:
      raise ValueError(f'The classifier takes uint8 images of shape (N, {self.image_shape}), got '
                       f'{images_BHWC.dtype} {images_BHWC.shape}.')
    mesh = sharding.make_mesh(jax.local_devices() if devices is None else devices)
    params = sharding.replicate(self.params, mesh)
    apply = self._apply(mesh)
    features, probs = device_map.map_batches(lambda start, x: apply(params, x), [images_BHWC], len(images_BHWC),
                                             batch_size, mesh, progress_label=progress_label)
    return features.astype(np.float64), probs.astype(np.float64)

  def protocol(self) -> dict:
    return {'name': f'cm_jax SmallCNN classifier ({FEATURE_DIM}-d penultimate layer; not Inception)',
            'comparable_to_published_fid': False,
            'note': ('Frechet distance in the feature space of a small classifier cm_jax trained on the '
                     f'{self.info["dataset"]} train split; comparable between cm_jax runs using the same '
                     'cached classifier, not to Inception FIDs.'),
            **{k: self.info[k] for k in ('dataset', 'pad_to', 'test_accuracy', 'train_steps', 'seed',
                                         'cache_file')}}

  @property
  def cache_id(self) -> str:
    return self.info['cache_key']


def _settings(config: ml_collections.ConfigDict) -> dict:
  ev = config.evaluation
  return {'dataset': config.data.name, 'pad_to': int(config.data.pad_to or 0),
          'train_steps': int(ev.classifier_steps), 'batch_size': int(ev.classifier_batch_size),
          'lr': float(ev.classifier_lr), 'seed': int(ev.classifier_seed), 'format': FORMAT_VERSION}


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                     test_labels: np.ndarray, *, steps: int, batch_size: int, lr: float, seed: int,
                     num_classes: int = 10) -> tuple[Any, float]:
  """Trains SmallCNN with Adam on (image, label) pairs; returns (params, test accuracy)."""
  if len(train_images) == 0 or len(test_images) == 0:
    raise ValueError('The classifier needs non-empty train and test splits.')
  model = SmallCNN(num_classes)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1,) + train_images.shape[1:]))['params']
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels, rng):
    def loss_fn(p):
      _, logits = model.apply({'params': p}, input_pipeline.to_model_range(images), train=True,
                              rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Steps are dispatched asynchronously; every 500 steps the loss is read, which waits for them: progress is
  # counted there, so the rate is of finished steps and counting adds no synchronisation.
  progress = progress_lib.Progress('Classifier training', total=steps, unit='steps', enabled=jax.process_index() == 0)
  loss_note, counted = None, 0
  for k in range(steps):
    idx = input_pipeline.batch_indices(seed, k, batch_size, len(train_images))
    params, opt_state, loss = step(params, opt_state, train_images[idx], train_labels[idx],
                                   jax.random.fold_in(key, k))
    if (k + 1) % 500 == 0 or k + 1 == steps:
      loss_note = f'loss {float(loss):.4f}'
      progress.update(k + 1 - counted, note=loss_note)
      counted = k + 1
  progress.done(note=loss_note)
  trained = Classifier(params, num_classes, tuple(train_images.shape[1:]), {})
  _, probs = trained(test_images, progress_label='Classifier test-set features')
  accuracy = float(np.mean(np.argmax(probs, axis=1) == test_labels))
  return params, accuracy


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """evaluation.cache_dir, else $CM_JAX_CACHE, else ~/.cache/cm_jax."""
  return (config.evaluation.cache_dir or os.environ.get('CM_JAX_CACHE')
          or os.path.join(os.path.expanduser('~'), '.cache', 'cm_jax'))


def load_or_train(config: ml_collections.ConfigDict) -> Classifier:
  """The cached classifier of config.data and config.evaluation's classifier settings; trains it if missing.

  The cache key covers the settings and the train split's sha256, so other data gets another classifier.
  """
  settings = _settings(config)
  train_images, train_labels = input_pipeline.load_labeled_images(config.data, 'train')
  num_classes = input_pipeline.num_classes(config.data)
  data_sha = hashlib.sha256(np.ascontiguousarray(train_images).tobytes()
                            + np.ascontiguousarray(train_labels).tobytes()).hexdigest()
  key = hashlib.sha256(json.dumps(dict(settings, data_sha256=data_sha), sort_keys=True).encode()).hexdigest()[:16]
  directory = os.path.join(cache_dir(config), 'classifier')
  stem = os.path.join(directory, f'{settings["dataset"]}_{key}')
  image_shape = tuple(train_images.shape[1:])
  if paths.exists(stem + '.json') and paths.exists(stem + '.msgpack'):  # Local or gs:// caches.
    info = json.loads(paths.read_bytes(stem + '.json'))
    template = SmallCNN(info['num_classes']).init(jax.random.PRNGKey(0), jnp.zeros((1,) + image_shape))['params']
    params = serialization.from_bytes(template, paths.read_bytes(stem + '.msgpack'))
    logging.info('Loaded the cached %s classifier %s (test accuracy %.4f).', settings['dataset'], stem,
                 info['test_accuracy'])
    return Classifier(params, info['num_classes'], image_shape, info)

  if config.data.name == 'image_folder':  # Its only split: hold out every tenth image to measure accuracy.
    held_out = np.arange(len(train_images)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    test_images, test_labels = train_images[held_out], train_labels[held_out]
    train_images, train_labels = train_images[~held_out], train_labels[~held_out]
  else:
    test_images, test_labels = input_pipeline.load_labeled_images(config.data, 'test')
  logging.info('Training the %s feature classifier (%d steps of %d; cached afterwards in %s).',
               settings['dataset'], settings['train_steps'], settings['batch_size'], directory)
  params, accuracy = train_classifier(train_images, train_labels, test_images, test_labels,
                                      steps=settings['train_steps'], batch_size=settings['batch_size'],
                                      lr=settings['lr'], seed=settings['seed'], num_classes=num_classes)
  info = dict(settings, num_classes=num_classes, test_accuracy=accuracy, num_train=int(len(train_images)),
              num_test=int(len(test_images)), data_sha256=data_sha, cache_key=key,
              cache_file=stem + '.msgpack')
  logging.info('Classifier test accuracy: %.4f on %d %s test images.', accuracy, len(test_images),
               settings['dataset'])
  params_bytes, info_bytes = serialization.to_bytes(params), json.dumps(info, indent=1).encode()
  paths.write_file(stem + '.msgpack', lambda f: f.write(params_bytes))
  paths.write_file(stem + '.json', lambda f: f.write(info_bytes))  # Written last: marks the entry complete.
  return Classifier(params, num_classes, image_shape, info)
