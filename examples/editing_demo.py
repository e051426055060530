r"""Renders every zero-shot editing task of cm_jax/core/editing.py on a trained MNIST-family consistency model.

    python examples/editing_demo.py --workdir=RUN --out=DIR [--num=8] [--seed=0] [--scale=3]

Clean images are the first --num images of the run's test split (`input_pipeline.load_images(config.data,
'test')`). Writes DIR/<name>.png (original | degraded | result, scaled up --scale times) and DIR/<name>.npz
per task, and DIR/all.png with every task stacked and labelled. Tasks: inpainting (centre and left-half
masks), super-resolution (factors 2 and 4), denoising (sigma 0.5 and 1.0), stroke-guided generation from
synthetic "paintings" (test images averaged over a 4 x 4 grid of patches, quantised to 4 gray levels) at
the paper's times (5.38, 2.24) and at lower ones (2.24, 0.82) that keep more of a 28x28 layout, interpolation
between noise pairs, and colorization, which is skipped for a grayscale model (it needs RGB).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cm_jax import edit  # pylint: disable=g-import-not-at-top
from cm_jax import inference  # pylint: disable=g-import-not-at-top
from cm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from cm_jax.core import editing  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Run directory of a consistency model.', required=True)
  flags.DEFINE_string('out', None, 'Output directory.', required=True)
  flags.DEFINE_integer('num', 8, 'Test images per task (noise pairs for interpolation).')
  flags.DEFINE_integer('seed', 0, 'Editing seed.')
  flags.DEFINE_integer('scale', 3, 'Nearest-neighbour upscaling of the PNGs, for viewing.')
  flags.DEFINE_string('ema', None, "Sampling EMA rate (default: the run's first), or 'online'.")
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_integer('class_label', None, 'Class-conditional models (required there): the class every edit '
                       'is conditioned on.')


def strokes(clean_uint8: np.ndarray, block: int, levels: int) -> np.ndarray:
  """A crude 'painting' of each image: means over a block x block grid of patches, quantised to `levels`
  gray levels (uint8)."""
  h, w = clean_uint8.shape[1:3]
  factor = next(p for p in range(h // block, 0, -1) if h % p == 0 and w % p == 0)
  x = editing.patch_average(clean_uint8.astype(np.float32) / 255.0, factor)
  return (np.round(x * (levels - 1)) / (levels - 1) * 255).astype(np.uint8)


def labelled(image_HWC: np.ndarray, label: str, scale: int) -> np.ndarray:
  """The image scaled up, with a white band holding the label above it (RGB)."""
  img = Image.fromarray(image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC).convert('RGB')
  img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  canvas = Image.new('RGB', (img.width, img.height + 16), 'white')
  canvas.paste(img, (0, 16))
  ImageDraw.Draw(canvas).text((4, 2), label, fill='black')
  return np.asarray(canvas)


def stack(panels: list[np.ndarray], gap: int = 8) -> np.ndarray:
  """Panels one under the other, left-aligned on white."""
  width = max(p.shape[1] for p in panels)
  rows = []
  for p in panels:
    rows.append(np.pad(p, ((0, gap), (0, width - p.shape[1]), (0, 0)), constant_values=255))
  return np.concatenate(rows)


def main(argv):
  del argv
  model = inference.load(FLAGS.workdir, step=FLAGS.checkpoint_step, ema=FLAGS.ema)
  clean = input_pipeline.load_images(model.config.data, 'test')[:FLAGS.num]
  h, w, c = model.image_shape
  print(f'{FLAGS.workdir}: step {model.step} ({model.which_params}), {model.config.loss.name}, '
        f'{h}x{w}x{c} {model.config.data.name}; {len(clean)} test images.')
  cc = model.config.consistency
  low_t = editing.times_from_indices((20, 24), cc.sigma_min, cc.sigma_max, cc.rho)
  jobs = [  # (name, task, input, options, label)
      ('inpaint_center', 'inpaint', clean, dict(mask='center'),
       f'inpainting, centre mask, times {_fmt(editing.INPAINT_TIMES)}'),
      ('inpaint_left', 'inpaint', clean, dict(mask='left'), 'inpainting, left half missing'),
      ('superres_x2', 'superres', clean, dict(factor=2),
       f'super-resolution x2 ({h // 2}x{w // 2} -> {h}x{w}), times {_fmt(editing.SUPERRES_TIMES)}'),
      ('superres_x4', 'superres', clean, dict(factor=4), f'super-resolution x4 ({h // 4}x{w // 4} -> {h}x{w})'),
      ('denoise_0.5', 'denoise', clean, dict(sigma=0.5), 'denoising, sigma 0.5: x = f(x_noisy, 0.5)'),
      ('denoise_1.0', 'denoise', clean, dict(sigma=1.0), 'denoising, sigma 1.0'),
      ('stroke', 'stroke', strokes(clean, block=4, levels=4), {},
       f'stroke-guided (SDEdit), times {_fmt(editing.STROKE_TIMES)}'),
      ('stroke_low_t', 'stroke', strokes(clean, block=4, levels=4), dict(ts=low_t),
       f'stroke-guided, lower times {_fmt(low_t)} (grid indices 20, 24; the paper\'s are for 256x256 images)'),
      ('interpolate', 'interpolate', None, {}, 'interpolation: slerp between two noises, one step'),
  ]
  if c == 3:
    jobs.insert(4, ('colorize', 'colorize', clean, {}, f'colorization, times {_fmt(editing.COLORIZE_TIMES)}'))
  else:
    print(f'Skipping colorization: it generates the colour of an RGB image with known luminance, and this '
          f'model makes {c}-channel (grayscale) images.')
  panels = []
  for name, task, images, options, label in jobs:
    arrays = edit.run_task(model, task, images, seed=FLAGS.seed, num=FLAGS.num, class_label=FLAGS.class_label,
                           **options)
    os.makedirs(FLAGS.out, exist_ok=True)
    npz = os.path.join(FLAGS.out, f'{name}.npz')
    np.savez(npz, **arrays)
    panel = labelled(edit.figure(arrays), label + ('' if task == 'interpolate' else
                                                   '  [original | degraded | result]'), FLAGS.scale)
    png = os.path.join(FLAGS.out, f'{name}.png')
    Image.fromarray(panel).save(png)
    panels.append(panel)
    print(f'Wrote {png} and {npz}.')
  combined = os.path.join(FLAGS.out, 'all.png')
  Image.fromarray(stack(panels)).save(combined)
  print(f'Wrote {combined}.')


def _fmt(ts) -> str:
  return '(' + ', '.join(f'{t:.3g}' for t in ts) + ')'


if __name__ == '__main__':
  define_flags()
  app.run(main)
