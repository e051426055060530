r"""Images per second of the image-folder reader (decode, centre crop, resize) at several thread counts, next to
the train step's images per second for a config; prints one JSON object per line.

  python benchmarks/reader.py --manual_dir=DIR --image_size=64 [--threads=1,2,4,16] [--workers=1,2] [--num=512]
      [--config=configs/imagenet64_ct.py]
  python benchmarks/reader.py --synthetic=256 [--width=500 --height=375]   # a temporary folder of random JPEGs

With --synthetic=N it writes N random JPEGs of --width x --height (ImageNet's typical 500x375 by default) into a
temporary folder; with --manual_dir it reads the first --num files of that image folder. For each thread count
one line: {"what": "reader", threads, images, seconds, images_per_s, image_size, cpu, load_average}, then one per
decode process count (--workers; data.decode_workers) with "workers" in place of "threads"; the images
are read in batches of --batch, as training reads them (cm_jax.data.image_folder.FolderStreamDataset). Then
one line {"what": "draft_mode", ...}: PIL's JPEG draft decoding (the decoder scales by 1/2, 1/4 or 1/8 while
decoding) against the full decode, both followed by cm_jax's crop and resize: its speed-up and the pixel
difference (max and mean, in uint8 levels) over the same files. With --config, one line {"what":
"train_step", images_per_s, ...} from benchmarks/train_step.py for that config (compiled step on synthetic
batches): the rate the reader has to keep up with on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from machine import cpu_model, load_average  # pylint: disable=wrong-import-position  (benchmarks/machine.py)

from cm_jax.data import image_folder  # pylint: disable=wrong-import-position


class UsageError(Exception):
  """A bad flag: one line on stderr, exit 2."""


def synthetic_folder(root: str, num: int, width: int, height: int, seed: int = 0) -> str:
  """`num` random-texture JPEGs of width x height in root/a (smooth noise: compresses like photographs)."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, 'a')
  os.makedirs(folder)
  for i in range(num):
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    image.save(os.path.join(folder, f'{i:06d}.jpg'), quality=90)
  return root


def time_reader(listing, size: int, num: int, batch: int, threads: int = 0, workers: int = 0) -> dict:
  """Images/s of FolderStreamDataset with `threads` threads, or `workers` processes (their start not timed)."""
  data = image_folder.FolderStreamDataset(listing, size, with_labels=False, threads=threads or None,
                                          workers=workers)
  rows = np.arange(min(num, data.num_examples))
  data.get(rows[:1])  # Starts the threads or processes.
  start = time.perf_counter()
  for i in range(0, len(rows), batch):
    data.get(rows[i:i + batch])
  seconds = time.perf_counter() - start
  data.close()
  how = {'workers': workers} if workers else {'threads': threads}
  return dict({'what': 'reader'}, **how, images=int(len(rows)), seconds=round(seconds, 3),
              images_per_s=round(len(rows) / seconds, 1), image_size=size)


def compare_draft(listing, size: int, num: int) -> dict:
  paths = [listing.path(i) for i in range(min(num, len(listing.files)))]
  paths = [p for p in paths if p.lower().endswith(('.jpg', '.jpeg'))]
  if not paths:
    return {'what': 'draft_mode', 'note': 'no JPEG files among those read'}
  start = time.perf_counter()
  full = [image_folder.decode(p, size) for p in paths]
  full_s = time.perf_counter() - start
  start = time.perf_counter()
  draft = [image_folder.decode(p, size, draft=True) for p in paths]
  draft_s = time.perf_counter() - start
  diff = np.abs(np.stack(full).astype(np.int32) - np.stack(draft).astype(np.int32))
  return {'what': 'draft_mode', 'images': len(paths), 'full_decode_ms': round(1000 * full_s / len(paths), 2),
          'draft_decode_ms': round(1000 * draft_s / len(paths), 2), 'speedup': round(full_s / draft_s, 2),
          'max_abs_diff': int(diff.max()), 'mean_abs_diff': round(float(diff.mean()), 3),
          'within_one_level': bool(diff.max() <= 1), 'image_size': size}


def train_step_rate(config_path: str) -> dict:
  import train_step  # pylint: disable=g-import-not-at-top  (benchmarks/train_step.py, beside this script)
  config = train_step.load_config(config_path)
  record = train_step.benchmark(config, name=config_path, steps=3, warmup=1)
  return {'what': 'train_step', 'config': config_path, 'images_per_s': record['images_per_s'],
          'batch_size': record['batch_size'], 'devices': record['devices'], 'device_kind': record['device_kind']}


def parse_ints(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise UsageError(f'{flag}={text}: expected comma-separated integers, e.g. 1,2,4.') from None
  if not values or min(values) < 1:
    raise UsageError(f'{flag}={text}: every value must be >= 1.')
  return values


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual_dir', help='An image folder (class subdirectories of JPEG/PNG files).')
  parser.add_argument('--synthetic', type=int, default=0, help='Write this many random JPEGs to read instead.')
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  parser.add_argument('--image_size', type=int, default=64, help='Side of the decoded, resized images.')
  parser.add_argument('--threads', default='1,2,4,16', help='Reader thread counts to time.')
  parser.add_argument('--workers', default='', help='Decode process counts to time (data.decode_workers), e.g. '
                      '1,2,4; none by default.')
  parser.add_argument('--num', type=int, default=512, help='Images read per thread count.')
  parser.add_argument('--batch', type=int, default=128, help='Images per read, as a training batch.')
  parser.add_argument('--config', help="A config whose train step's images/s to print beside (optional).")
  args = parser.parse_args(argv)
  try:
    threads = parse_ints(args.threads, '--threads')
    workers = parse_ints(args.workers, '--workers') if args.workers.strip() else []
    if (args.manual_dir is None) == (args.synthetic <= 0):
      raise UsageError('give either --manual_dir=DIR or --synthetic=N (N >= 1).')
    for name in ('num', 'batch', 'image_size', 'width', 'height'):
      if getattr(args, name) < 1:
        raise UsageError(f'--{name} must be >= 1, got {getattr(args, name)}.')
    with tempfile.TemporaryDirectory(prefix='cm_jax_reader_') as tmp:
      root = synthetic_folder(tmp, args.synthetic, args.width, args.height) if args.synthetic else args.manual_dir
      try:
        listing = image_folder.list_folder(root, None)
      except Exception as e:  # pylint: disable=broad-except  (DataUnavailableError, ValueError, OSError)
        raise UsageError(f'--manual_dir={root}: {e}') from None
      machine = {'cpu': cpu_model(), 'cpus': os.cpu_count(), 'load_average': load_average()}
      for n in threads:
        print(json.dumps(dict(time_reader(listing, args.image_size, args.num, args.batch, threads=n), **machine)),
              flush=True)
      for n in workers:
        print(json.dumps(dict(time_reader(listing, args.image_size, args.num, args.batch, workers=n), **machine)),
              flush=True)
      print(json.dumps(dict(compare_draft(listing, args.image_size, min(args.num, 256)), **machine)), flush=True)
    if args.config:
      print(json.dumps(dict(train_step_rate(args.config), **machine)), flush=True)
  except UsageError as e:
    sys.stderr.write(f'reader.py: error: {e}\n')
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
