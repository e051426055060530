r"""A crude sample-quality proxy: Frechet distance in a PCA space of the test images; prints JSON.

  python benchmarks/pixel_fd.py --workdir=DIR --num=2000 --steps=1,2 --two_step_ts=0.8,1.5,2.52
  python benchmarks/pixel_fd.py --workdir=EDM_TEACHER --num=2000 --steps=18 --solvers=heun,euler

Features are the projections of [-1, 1] images onto the top --dims principal components of the dataset's
test split. This is NOT an Inception FID and is not comparable to published numbers; it only ranks models
and sampling times of one dataset against each other. Reference: the same distance between the train and
test splits (printed as `train_vs_test`).
"""

import json
import time

from absl import app
from absl import flags
import numpy as np

from cm_jax import inference
from cm_jax import input_pipeline
from cm_jax import samplers

flags.DEFINE_string('workdir', None, 'Run directory.', required=True)
flags.DEFINE_integer('num', 2000, 'Samples per setting.')
flags.DEFINE_list('steps', None, 'Step counts to evaluate (2 uses each of --two_step_ts); default 1,2. For an '
                  'EDM model, Karras-grid steps of each of --solvers; default config.sampling.diffusion_steps.')
flags.DEFINE_list('solvers', ['heun'], 'EDM models only: ODE solvers to evaluate.')
flags.DEFINE_list('two_step_ts', [], 'Intermediate times for two-step sampling (default: the config).')
flags.DEFINE_integer('dims', 64, 'PCA dimensions.')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
FLAGS = flags.FLAGS


def frechet(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace term via eigenvalues of C1 C2."""
  eig = np.linalg.eigvals(cov1 @ cov2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
               - 2.0 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


def main(_):
  model = inference.load(FLAGS.workdir)
  test = input_pipeline.to_model_range(input_pipeline.load_images(model.config.data, 'test'))
  train = input_pipeline.to_model_range(input_pipeline.load_images(model.config.data, 'train'))
  flat = test.reshape(len(test), -1).astype(np.float64)
  mean = flat.mean(0)
  _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
  basis = vt[:FLAGS.dims].T

  def stats(x):
    f = (x.reshape(len(x), -1).astype(np.float64) - mean) @ basis
    return f.mean(0), np.cov(f, rowvar=False)

  ref = stats(test)
  rng = np.random.default_rng(0)
  results = {'workdir': FLAGS.workdir, 'step': model.step, 'params': model.which_params, 'num': FLAGS.num,
             'dims': FLAGS.dims, 'reference': 'test split',
             'train_vs_test': frechet(*stats(train[rng.choice(len(train), FLAGS.num, replace=False)]), *ref)}
  if FLAGS.steps is not None:
    step_counts = [int(s) for s in FLAGS.steps]
  else:
    step_counts = [model.config.sampling.diffusion_steps] if model.is_diffusion_model else [1, 2]
  for steps in step_counts:
    if model.is_diffusion_model:
      settings = [(solver, None, f'{solver}_{steps}step') for solver in FLAGS.solvers]
    else:
      times_list = [[float(t)] for t in FLAGS.two_step_ts] if steps == 2 and FLAGS.two_step_ts else [None]
      settings = []
      for times in times_list:
        ts_used = samplers.sampling_times(model.config, steps, times)
        settings.append(('consistency', times, f'{steps}step' + (f'_t{ts_used[0]:g}' if ts_used else '')))
    for sampler, times, name in settings:
      t0 = time.time()
      x = model.sample_float(FLAGS.num, steps=steps, ts=times, seed=FLAGS.seed, sampler=sampler)
      results[f'fd_{name}'] = frechet(*stats(x), *ref)
      results[f'seconds_{name}'] = round(time.time() - t0, 1)
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
