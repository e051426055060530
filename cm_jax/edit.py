r"""Zero-shot editing CLI (CM Algorithm 4): inpainting, colorization, super-resolution, interpolation,
denoising and stroke-guided generation with a trained consistency model.

    python -m cm_jax.edit --workdir=RUN --task=inpaint --input=images.npz --out=DIR --mask=center
    python -m cm_jax.edit --workdir=RUN --task=superres --input=images.npz --out=DIR --factor=4
    python -m cm_jax.edit --workdir=RUN --task=interpolate --out=DIR --num=8

--input holds clean images: an .npz (key 'arr_0' or its only key; uint8 (N, H, W, C) or (N, H, W), the
layout cm_jax.sample writes), one PNG, or a directory of PNGs. The CLI degrades them itself (masked,
grayscale, patch-averaged, or noised with --sigma) and edits the degraded images; for 'stroke' the input is
the stroke painting, and 'interpolate' takes no input (it interpolates --num pairs of noises). A grayscale
input for an RGB model is replicated to RGB; an RGB input for a grayscale model is refused.

Writes DIR/<task>.npz (uint8 arrays 'original', 'degraded', 'result'; for 'interpolate' only 'result',
(num, alphas, H, W, C)) and DIR/<task>.png (original | degraded | result grids, or one row per pair).
'degraded' is what the model was given, rounded to uint8 (a noisy image is clipped to [0, 255] there only).
The same seed, checkpoint and flags give the same images; image i depends only on (seed, i).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cm_jax import inference
from cm_jax import input_pipeline
from cm_jax import samplers
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import editing
from cm_jax.core import sampling
from cm_jax.data import transforms
from cm_jax.data.image_folder import IMAGE_EXTENSIONS
from cm_jax.runtime import cli
from cm_jax.runtime import device_map
from cm_jax.runtime import errors
from cm_jax.runtime import images as images_lib
from cm_jax.runtime import multihost
from cm_jax.runtime import npz_files
from cm_jax.runtime import paths
from cm_jax.runtime import sharding

FLAGS = flags.FLAGS

TASKS = ('inpaint', 'colorize', 'superres', 'interpolate', 'denoise', 'stroke')
_TIMED_TASKS = {'inpaint': editing.INPAINT_TIMES, 'colorize': editing.COLORIZE_TIMES,
                'superres': editing.SUPERRES_TIMES, 'stroke': editing.STROKE_TIMES}


def define_flags() -> None:
  multihost.define_flags()
  flags.DEFINE_string('workdir', None, 'Run directory of a consistency model (CT, CD or ECT).', required=True)
  flags.DEFINE_enum('task', None, list(TASKS), 'Editing task.', required=True)
  flags.DEFINE_string('input', None, 'Clean images (.npz, a PNG or JPEG, or a directory of them; converted and '
                      "resized as the trainer reads images); the stroke painting for 'stroke'; not used by "
                      "'interpolate'.")
  flags.DEFINE_string('out', None, 'Output directory for <task>.npz and <task>.png.', required=True)
  flags.DEFINE_string('mask', 'center', f"inpaint: one of {', '.join(editing.MASKS)}, or a PNG of the image "
                      'size whose white (>= 128) pixels are missing.')
  flags.DEFINE_integer('factor', 2, 'superres: patch size p (the low resolution is H/p x W/p).')
  flags.DEFINE_float('sigma', 0.5, 'denoise: std of the Gaussian noise added to the clean images.')
  flags.DEFINE_list('ts', None, 'Descending times t_1 > ... > t_N in (sigma_min, sigma_max] for inpaint, '
                    'colorize, superres and stroke (default: see cm_jax/core/editing.py).')
  flags.DEFINE_integer('seed', 0, 'Seed of the editing noise (and of the noise of --task=denoise).')
  flags.DEFINE_integer('num', 16, 'Images to edit (the first --num of --input), or noise pairs to interpolate.')
  flags.DEFINE_integer('alphas', 8, 'interpolate: points from z1 (alpha 0) to z2 (alpha 1).')
  flags.DEFINE_string('ema', None, "Sampling EMA rate to use (default: the run's first), or 'online'.")
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_integer('batch_size', 64, 'Images per device call.')
  flags.DEFINE_integer('class_label', None, 'Class-conditional models: the class the images are edited as '
                       "(default: one label per image from an --input .npz's 'arr_1', as cm_jax.sample saves them).")


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------
def open_image(path: str, flag: str) -> Image.Image:
  """PIL image of `path`; a missing or undecodable file is an InputFileError naming `flag` and the file."""
  if not os.path.isfile(path):
    raise errors.InputFileError(f'{flag}={path}: no such file.')
  try:
    img = Image.open(path)
    img.load()
    return img
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError.
    raise errors.InputFileError(f'{flag}={path} is not a readable image ({one_line_reason(e)}); give a PNG or '
                                'JPEG file.') from None


def one_line_reason(e: Exception) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def load_images(path: str) -> np.ndarray | list[np.ndarray]:
  """uint8 images as stored in `path`: an .npz ((N, H, W, C) array, key 'arr_0' or its only key), one PNG or
  JPEG file, or a directory of them (a list, sizes and channels may differ). fit_to_model makes them the
  model's shape."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
    if not files:
      raise errors.InputFileError(f'--input={path} is a directory without image files '
                                  f'({"/".join(IMAGE_EXTENSIONS)}).')
    out = []
    for f in files:
      with open_image(f, '--input') as img:
        out.append(transforms.stored_array(img))
    return out
  if path.lower().endswith(IMAGE_EXTENSIONS):
    with open_image(path, '--input') as img:
      return transforms.stored_array(img)[None]
  if path.endswith('.npz'):
    return npz_files.read_images(path, '--input')
  if not os.path.exists(path):
    raise errors.InputFileError(f'--input={path}: no such file or directory.')
  raise errors.UsageError(f'--input={path}: expected an .npz file, a PNG or JPEG file, or a directory of them.')


def fit_to_model(images: np.ndarray | list[np.ndarray], image_shape: tuple[int, int, int],
                 what: str = 'input') -> np.ndarray:
  """uint8 (N, H, W, C) of the model's shape, as the trainer reads image files: alpha dropped, grayscale
  replicated for an RGB model, other sizes centre-cropped to a square and resized (transforms.resize_square).
  Prints one line per conversion made. An RGB image for a grayscale model is refused: which gray it should
  be is not ours to guess."""
  h, w, c = image_shape
  notes, out = set(), []
  for image in images:
    channels = image.shape[-1]
    if channels in (2, 4):
      image, channels = image[..., :channels - 1], channels - 1
      notes.add('dropped the alpha channel')
    if channels == 3 and c == 1:
      raise ValueError(f'The {what} images are RGB and the model makes grayscale images; convert them to '
                       'grayscale first (an RGB input for a grayscale model is not converted silently).')
    if channels == 1 and c == 3:
      image = np.repeat(image, 3, axis=-1)
      notes.add('replicated the gray channel to RGB')
    if image.shape[:2] != (h, w):
      notes.add(f'centre-cropped and resized {image.shape[1]}x{image.shape[0]} to {w}x{h}')
      square = Image.fromarray(np.ascontiguousarray(transforms.center_crop_square(image)).squeeze(-1) if c == 1 else
                               np.ascontiguousarray(transforms.center_crop_square(image)))
      resized = np.asarray(transforms.resize_square(square, h) if h == w else square.resize((w, h)), np.uint8)
      image = resized[..., None] if resized.ndim == 2 else resized
    out.append(image)
  for note in sorted(notes):
    print(f'The {what} images: {note} (as the trainer reads image files).')
  return np.stack(out)


def match_model(images_NHWC: np.ndarray, image_shape: tuple[int, int, int], what: str = 'input') -> np.ndarray:
  """Checks the size against the model's; replicates grayscale to RGB for an RGB model; refuses the reverse."""
  h, w, c = image_shape
  if images_NHWC.shape[1:3] != (h, w):
    raise ValueError(f'The {what} images are {images_NHWC.shape[1]}x{images_NHWC.shape[2]}, but the model makes '
                     f'{h}x{w} images; resize them (or pad them as config.data.pad_to does) first.')
  ci = images_NHWC.shape[3]
  if ci == c:
    return images_NHWC
  if ci == 1 and c == 3:
    print(f'The {what} images are grayscale and the model is RGB: replicating the gray channel.')
    return np.repeat(images_NHWC, 3, axis=3)
  raise ValueError(f'The {what} images have {ci} channel(s) and the model {c}; convert them first (an RGB '
                   'input for a grayscale model is not converted silently).')


def load_mask(spec: str, image_shape: tuple[int, int, int]) -> np.ndarray:
  """(1, H, W, 1) float32, 1 = missing: a named mask or a PNG whose white (>= 128) pixels are missing."""
  h, w, _ = image_shape
  if spec in editing.MASKS:
    return editing.named_mask(spec, h, w)
  if not spec.endswith('.png'):
    raise ValueError(f'--mask={spec!r} is neither one of {editing.MASKS} nor a .png path.')
  with open_image(spec, '--mask') as img:
    gray = np.asarray(img.convert('L'))
  if gray.shape != (h, w):
    raise ValueError(f'--mask={spec} is {gray.shape[0]}x{gray.shape[1]}, the model makes {h}x{w} images.')
  return (gray >= 128).astype(np.float32)[None, :, :, None]


# --------------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------------
def default_times(task: str, first: float, sigma_max: float) -> tuple[float, ...]:
  """The task's default times, their leading sigma_max replaced by `first`, the run's first sampling time
  (sampling.start_t when set): editing from pure noise starts where sampling does, and default times at or
  above that start are dropped. Stroke-guided times start below either and stay as they are."""
  times = tuple(_TIMED_TASKS[task])
  if times and times[0] == sigma_max and first != sigma_max:
    times = (first,) + tuple(t for t in times[1:] if t < first)  # A low start drops the times above it.
  return times


def run_task(model: inference.LoadedModel, task: str, clean_uint8: Optional[np.ndarray], *, mask: str = 'center',
             factor: int = 2, sigma: float = 0.5, ts: Optional[Sequence[float]] = None, seed: int = 0,
             num: int = 16, alphas: int = 8, batch_size: int = 64,
             class_label: Optional[int | np.ndarray] = None) -> dict[str, np.ndarray]:
  """Degrades clean images (model-shaped uint8) and edits them; returns uint8 'original', 'degraded', 'result'
  ('interpolate': only 'result', (num, alphas, H, W, C)). Image i depends only on (seed, i).

  class_label: the class the network calls are conditioned on, one for all images (an int) or one per image (an
  array, e.g. the labels cm_jax.sample saved beside the images); required for a class-conditional model and
  refused for an unconditional one."""
  if model.is_diffusion_model:
    raise ValueError(f'This run is an EDM diffusion model (loss.name = {model.config.loss.name!r}); zero-shot '
                     'editing needs a consistency model, whose f(x, t) maps any noise level to an image in one '
                     "call. Distil or tune it first (loss.name = 'cd' or 'ect').")
  if model.is_flow_model:
    raise ValueError("This run is a MeanFlow flow map (loss.name = 'meanflow'); cm_jax's zero-shot editing is "
                     "written for consistency models (CM Algorithm 4, f(x, sigma) at EDM noise levels) and is not "
                     'defined for flow maps yet: edit a consistency model (ct, cd, ect, sct, scd) instead.')
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; choose one of {TASKS}.')
  if ts is not None and task not in _TIMED_TASKS:
    raise ValueError(f'--ts is for {sorted(_TIMED_TASKS)}; {task!r} makes one network call at a fixed time.')
  if num < 1 or batch_size < 1 or alphas < 1:
    raise ValueError(f'num, batch_size and alphas must be >= 1, got {num}, {batch_size}, {alphas}.')
  cc, clip = model.config.consistency, model.config.sampling.clip
  h, w, c = model.image_shape
  if task == 'colorize' and c != 3:
    raise ValueError(f'colorize needs an RGB model; this run makes {c}-channel images '
                     f'(data.name = {model.config.data.name!r}), so there is no colour to generate.')
  # eps of the run's consistency function (0 for sCM runs): the re-noising of each later step, as in sampling.
  bounds = dict(sigma_min=denoiser_lib.boundary(model.config), sigma_max=cc.sigma_max)
  first = samplers.start_time(model.config)  # sampling.start_t, else sigma_max: where sampling starts too.
  times = None
  if task in _TIMED_TASKS:
    times = editing.validate_edit_times(default_times(task, first, cc.sigma_max) if ts is None else ts, **bounds)
  seed_key = jax.random.PRNGKey(seed)
  edit_seed, degrade_seed = jax.random.fold_in(seed_key, 0), jax.random.fold_in(seed_key, 1)

  if model.num_classes and class_label is None:
    raise ValueError(f'This model is class-conditional ({model.num_classes} classes): pass --class_label=K, the '
                     "class of the images to edit (or give an .npz whose 'arr_1' holds one label per image).")
  per_image = class_label is not None and np.ndim(class_label) == 1
  if not per_image:  # Checks class_label against the model (range, conditional or not).
    model.labels(1, labels=class_label)
  elif task == 'interpolate':
    raise ValueError('interpolate takes one --class_label for all noise pairs, not one per image.')

  # Each batch is split over every device of every process, the parameters replicated (as in sampling).
  mesh = sharding.make_mesh()
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = sharding.replicate(model.params, mesh)

  def keys_of(seed_key, start, count):  # Keys of examples start, ..., start + count - 1, split over the mesh.
    return sharding.shard_batch(sampling.example_keys(seed_key, start, count), mesh)

  def f(params, labels_B=None):
    if class_label is None:
      return functools.partial(model.denoiser, params)
    if labels_B is None:
      labels_B = jnp.full((1,), class_label, jnp.int32)
    return lambda x, sigma: model.denoiser(params, x, sigma, labels_B=jnp.broadcast_to(labels_B, x.shape[:1]))

  if task == 'interpolate':
    alphas_A = jnp.linspace(0.0, 1.0, alphas)

    @functools.partial(jax.jit, in_shardings=(replicated, batch, batch), out_shardings=batch)
    def interp(params, keys1, keys2):
      z1 = jax.vmap(lambda k: jax.random.normal(k, (h, w, c)))(keys1)
      z2 = jax.vmap(lambda k: jax.random.normal(k, (h, w, c)))(keys2)
      x_ABHWC = editing.interpolate(f(params), z1, z2, alphas_A, sigma_max=first, clip=clip)
      return jnp.swapaxes(x_ABHWC, 0, 1)

    def run_interp(start, index):
      return interp(params, keys_of(edit_seed, start, len(index)), keys_of(degrade_seed, start, len(index)))
    x = device_map.map_batches(run_interp, [np.arange(num)], num, batch_size, mesh,
                               progress_label='Editing (interpolate)', unit='noise pairs')
    return {'result': input_pipeline.to_uint8(x)}

  if clean_uint8 is None:
    raise ValueError(f'--task={task} needs --input images.')
  clean_uint8 = match_model(clean_uint8, model.image_shape, 'stroke' if task == 'stroke' else 'input')[:num]
  num = len(clean_uint8)
  if per_image:
    if len(class_label) < num:
      raise ValueError(f'{len(class_label)} class labels for {num} images; give one per image.')
    labels_N = model.labels(num, labels=np.asarray(class_label)[:num])
  else:
    labels_N = np.full((num,), 0 if class_label is None else class_label, np.int32)
  x_clean = input_pipeline.to_model_range(clean_uint8)
  if task == 'inpaint':
    m = load_mask(mask, model.image_shape)
    degraded = np.asarray(editing.known_part(jnp.asarray(x_clean), m, editing.Identity()))
    edit_fn = lambda fn, x, keys: editing.inpaint(fn, x, m, keys, times, **bounds, clip=clip)
  elif task == 'colorize':
    degraded = editing.gray_to_rgb(editing.luminance(x_clean))
    edit_fn = lambda fn, x, keys: editing.colorize(fn, x, keys, times, **bounds, clip=clip)
  elif task == 'superres':
    editing.check_divisible(h, w, factor)
    degraded = editing.patch_average(x_clean, factor)
    edit_fn = lambda fn, x, keys: editing.super_resolve(fn, x, factor, keys, times, **bounds, clip=clip)
  elif task == 'stroke':
    degraded = x_clean
    edit_fn = lambda fn, x, keys: editing.stroke_guided(fn, x, keys, times, **bounds, clip=clip)
  else:  # denoise
    if not bounds['sigma_min'] <= sigma <= cc.sigma_max:
      raise ValueError(f"--sigma={sigma} is outside [{bounds['sigma_min']}, {cc.sigma_max}] (the run's boundary "
                       'time and sigma_max).')
    noise = device_map.map_batches(lambda start, x: jax.vmap(lambda k: jax.random.normal(k, (h, w, c)))(
        sampling.example_keys(degrade_seed, start, len(x))), [x_clean], num, batch_size)
    degraded = x_clean + np.float32(sigma) * noise
    edit_fn = lambda fn, x, keys: editing.denoise(fn, x, sigma, **bounds, clip=clip)

  run = jax.jit(lambda params, x, keys, labels_B: edit_fn(f(params, labels_B), x, keys),
                in_shardings=(replicated, batch, batch, batch), out_shardings=batch)
  result = device_map.map_batches(lambda start, x, labels_B: run(params, x, keys_of(edit_seed, start, len(x)),
                                                                 labels_B),
                                [np.asarray(degraded, np.float32), labels_N], num, batch_size, mesh,
                                progress_label=f'Editing ({task})')
  return {'original': clean_uint8, 'degraded': input_pipeline.to_uint8(degraded),
          'result': input_pipeline.to_uint8(result)}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def rows_grid(images_NAHWC: np.ndarray, pad: int = 2, pad_value: int = 128) -> np.ndarray:
  """One row per n of (N, A, H, W, C) uint8 images."""
  n, a = images_NAHWC.shape[:2]
  return images_lib.make_grid(images_NAHWC.reshape((n * a,) + images_NAHWC.shape[2:]), pad, pad_value, cols=a)


def figure(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """original | degraded | result grids side by side; interpolation: one row per noise pair."""
  if 'original' not in arrays:
    return rows_grid(arrays['result'])
  return images_lib.side_by_side([images_lib.make_grid(arrays[k]) for k in ('original', 'degraded', 'result')])


def write(arrays: dict[str, np.ndarray], out_dir: str, task: str) -> tuple[str, str]:
  """Writes out_dir/<task>.npz and out_dir/<task>.png; returns their paths."""
  npz = paths.write_file(os.path.join(out_dir, f'{task}.npz'), lambda f: np.savez(f, **arrays))
  png = images_lib.save_png(figure(arrays), os.path.join(out_dir, f'{task}.png'))
  return npz, png


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  for name in ('num', 'alphas', 'batch_size', 'factor'):
    if FLAGS[name].value < 1:
      raise errors.UsageError(f'--{name} must be >= 1, got {FLAGS[name].value}.')
  times = cli.parse_floats('ts', FLAGS.ts)
  if FLAGS.task != 'interpolate' and FLAGS.input is None:
    raise errors.UsageError(f'--task={FLAGS.task} needs --input (clean images, or the stroke painting for stroke).')
  multihost.initialize_from_flags()  # Before any device use: TPU pods, SLURM, or the explicit flags.
  # Before the editing, not after it; every process stops if it fails.
  multihost.on_process_zero(lambda: cli.check_writable_dir(FLAGS.out, '--out'))
  model = inference.load(FLAGS.workdir, step=FLAGS.checkpoint_step, ema=FLAGS.ema)
  if FLAGS.task == 'interpolate':  # --num pairs x --alphas images, held in host memory as float32 and uint8.
    cli.check_fits_in_memory(FLAGS.num * FLAGS.alphas * int(np.prod(model.image_shape)) * 5,
                             f'--num={FLAGS.num} pairs x --alphas={FLAGS.alphas}', 'lower --num or --alphas.')
  try:
    clean, class_label = None, FLAGS.class_label
    if FLAGS.task != 'interpolate':
      clean = fit_to_model(load_images(FLAGS.input), model.image_shape,
                           'stroke' if FLAGS.task == 'stroke' else 'input')
      if class_label is None and model.num_classes and FLAGS.input.endswith('.npz'):
        class_label = npz_files.read_labels(FLAGS.input, '--input', len(clean))
        if class_label is not None:
          print(f"Editing each image as its class in {FLAGS.input}'s 'arr_1'.")
    arrays = run_task(model, FLAGS.task, clean, mask=FLAGS.mask, factor=FLAGS.factor, sigma=FLAGS.sigma,
                      ts=times, seed=FLAGS.seed, num=FLAGS.num, alphas=FLAGS.alphas, batch_size=FLAGS.batch_size,
                      class_label=class_label)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  # Every process edited (its share of each batch) and holds all images; process 0 writes them, and every
  # process ends with its error if that fails.
  multihost.on_process_zero(lambda: report(arrays, model))


def report(arrays: dict[str, np.ndarray], model: inference.LoadedModel) -> None:
  npz, png = write(arrays, FLAGS.out, FLAGS.task)
  shapes = ', '.join(f'{k} {v.shape}' for k, v in arrays.items())
  print(f'Wrote {npz}: uint8 {shapes} ({FLAGS.task}, step {model.step}, {model.which_params}).')
  print(f'Wrote {png}: ' + ('one row per noise pair, alpha 0 to 1.' if FLAGS.task == 'interpolate' else
                            'original | degraded | result.'))


if __name__ == '__main__':
  cli.run(main, define_flags)
