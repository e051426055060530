r"""The evaluate CLI; the library is cm_jax/evaluation/ (evaluator.py, two_step_search.py, metrics.py).

  python -m cm_jax.evaluate --workdir=DIR --num=10000 --steps=1,2
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
    caches (cm_jax/evaluation/classifier.py); keys 'classifier_fd' and 'classifier_score'. NOT comparable to
    Inception FIDs.
Reference features are computed once per (dataset, split, size, feature network) and cached under
CACHE_DIR/reference/.

--search_two_step: ternary search of the intermediate time of two-step sampling over the interior of a
--search_points Karras grid (as the official CM code: CIFAR-10 CD picks index 11 of 18, sigma = 0.585),
minimising the Frechet distance with the same noise at every candidate; reports the chosen time.
--memorization: pixel distance of samples to their nearest training image, against the same for held-out
images (cm_jax.evaluation.metrics.memorization).
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from absl import flags
import ml_collections
import numpy as np

from cm_jax import config_validation
from cm_jax import inference
from cm_jax import samplers
from cm_jax.data import catalog
from cm_jax.evaluation import classifier as classifier_lib
from cm_jax.evaluation import evaluator as evaluator_lib
from cm_jax.runtime import cli
from cm_jax.runtime import errors
from cm_jax.runtime import multihost
from cm_jax.runtime import npz_files
from cm_jax.runtime import paths


def load_samples_file(path: str, image_shape: Sequence[int], crop: int = 0,
                      num: Optional[int] = None) -> np.ndarray:
  """uint8 (N, H, W, C) images from an .npz file (npz_files.read_images), with `crop` pixels cut from each
  border, checked against the dataset's image_shape; the first `num` of them."""
  images = npz_files.read_images(path, '--samples')
  if crop:
    if 2 * crop >= min(images.shape[1:3]):
      raise errors.UsageError(f'--crop={crop} leaves nothing of {images.shape[1]}x{images.shape[2]} images.')
    images = images[:, crop:-crop, crop:-crop, :]
  if tuple(images.shape[1:]) != tuple(image_shape):
    h, w = images.shape[1] - image_shape[0], images.shape[2] - image_shape[1]
    hint = (f' (--crop={h // 2} cuts the {h // 2}-pixel border)' if h == w and h > 0 and h % 2 == 0 and
            images.shape[3] == image_shape[2] else '')
    raise errors.UsageError(f'--samples={path}: images of shape {tuple(images.shape[1:])} after --crop={crop}; '
                            f'the dataset\'s are {tuple(image_shape)}{hint}.')
  if num is not None:
    if num > len(images):
      raise errors.UsageError(f'--num={num}, but --samples={path} holds {len(images)} images.')
    images = images[:num]
  return np.ascontiguousarray(images)


def eval_config(name: str) -> ml_collections.ConfigDict:
  """get_config() of the config module cm_jax.configs.NAME (its evaluation group scores --samples)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  from cm_jax import configs  # pylint: disable=g-import-not-at-top
  names = sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != 'common')  # Not a config.
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
  if FLAGS.output:
    multihost.on_process_zero(lambda: cli.check_writable_file(FLAGS.output, '--output'))
  images = load_samples_file(FLAGS.samples, catalog.image_shape(config.data), FLAGS.crop,
                             FLAGS.num if FLAGS['num'].present else None)
  write_report(evaluator_lib.evaluate_samples(evaluator_lib.make_evaluator_on_all_processes(config), images,
                                              FLAGS.samples, FLAGS.dataset))


def write_report(out: dict) -> None:
  """The JSON object on stdout (and in --output), from process 0: every process computed the same report."""
  text = json.dumps(out, indent=1)

  def write() -> None:
    if FLAGS.output:
      paths.write_file(FLAGS.output, lambda f: f.write((text + '\n').encode()))
    sys.stdout.write(text + '\n')

  multihost.on_process_zero(write)


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
  flags.DEFINE_enum('sampler', None, ['consistency', 'heun', 'euler', 'meanflow'], 'Default: the model\'s own.')
  flags.DEFINE_list('ts', None, 'Intermediate times, for a single --steps value > 1 (default: the config\'s).')
  flags.DEFINE_float('start_t', None, 'Consistency sampling\'s first time, in (sigma_min, sigma_max] (default: '
                     'the run\'s sampling.start_t, else sigma_max).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('batch_size', 256, 'Samples per device call.')
  flags.DEFINE_string('ema', None, "Sampling EMA rate (default: the run's first), or 'online'.")
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_enum('feature_net', None, list(evaluator_lib.FEATURE_NETS),
                    'Default: the run\'s evaluation.feature_net.')
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
  if FLAGS.output:  # Before the sampling, not after it; every process stops if it fails.
    multihost.on_process_zero(lambda: cli.check_writable_file(FLAGS.output, '--output'))
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
    samplers.set_start_time(config, FLAGS.start_t)
  except ValueError as e:
    raise errors.UsageError(f'--start_t={FLAGS.start_t:g}: {e}') from e
  # Classifiers and reference features are cached there.
  multihost.on_process_zero(lambda: cli.check_writable_dir(
      classifier_lib.cache_dir(config), '--cache_dir' if FLAGS.cache_dir else
      'the evaluation cache (evaluation.cache_dir, $CM_JAX_CACHE or ~/.cache/cm_jax)'))
  cli.check_fits_in_memory(FLAGS.num * int(np.prod(model.image_shape)) * 5, f'--num={FLAGS.num}',
                           'lower --num.')
  try:
    if step_counts is None:
      step_counts = [None] if model.is_diffusion_model else [1, 2]
    if times is not None and len(step_counts) != 1:
      raise errors.UsageError('--ts needs a single --steps value.')
    specs = [samplers.make_sampler(config, FLAGS.sampler, s, times) for s in step_counts]
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  evaluator = evaluator_lib.make_evaluator_on_all_processes(config)
  out = evaluator_lib.evaluate(model, evaluator, specs, FLAGS.num, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                               search_points=FLAGS.search_points if FLAGS.search_two_step else 0,
                               search_num=FLAGS.search_num, memorization_num=FLAGS.memorization)
  write_report(out)


if __name__ == '__main__':
  cli.run(main, define_flags)
