r"""Decode an image folder once into a memory-mapped array, then train from it at memory speed.

  python -m cm_jax.prepare --config=configs/imagenet64_edm.py --config.data.manual_dir=/data/imagenet/train \
      --out=/data/imagenet64_prepared [--workers=-1] [--part=0/1]
  python -m cm_jax.train --config=configs/imagenet64_edm.py --config.data.storage=prepared \
      --config.data.prepared_dir=/data/imagenet64_prepared --workdir=RUN

The folder is read as training reads it (data.manual_dir, data.class_map, data.image_size, data.jpeg_draft,
data.skip_unreadable: every file's header is checked first); the rows are those of data.storage = 'stream' or
'memory', in the same order, so a run may switch between the three storages and still resume. --workers decoding
processes (default: one per core). Progress and an ETA are logged; an interrupted preparation continues where it
stopped when run again with the same flags. Several machines sharing one file system split the work with
--part=I/N (each takes every N-th chunk; the last to finish marks the directory complete). --out defaults to
data.prepared_dir. See docs/data.md.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from cm_jax import config_validation
from cm_jax.data import catalog
from cm_jax.data import image_folder
from cm_jax.data import prepared
from cm_jax.runtime import cli
from cm_jax.runtime import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('out', None, 'Directory to write (default: the config\'s data.prepared_dir).')
  flags.DEFINE_integer('workers', -1, 'Decoding processes: -1 one per core, 0 threads in this process, N.')
  flags.DEFINE_string('part', '0/1', 'I/N: this process takes chunks k with k %% N == I (machines sharing a file '
                      'system); 0/1 does all of them.')


def parse_part(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise errors.UsageError(f'--part={text}: give I/N, e.g. 0/1 (everything) or 1/4 (the second of four).') from None
  if not (count >= 1 and 0 <= index < count):
    raise errors.UsageError(f'--part={text}: need 0 <= I < N, e.g. 0/1 or 1/4.')
  return index, count


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  if FLAGS.config is None:
    raise errors.UsageError('--config=CONFIG.py is required (its data fields say which folder and size).')
  config = FLAGS.config
  if config.data.name != 'image_folder':
    raise errors.UsageError(f"config.data.name is {config.data.name!r}: cm_jax.prepare reads image folders "
                            "(--config.data.name=image_folder --config.data.manual_dir=DIR).")
  part = parse_part(FLAGS.part)
  out = FLAGS.out or config.data.get('prepared_dir', None)
  if not out:
    raise errors.UsageError('Give --out=DIR (or set --config.data.prepared_dir=DIR).')
  if config.data.get('manual_dir', None) is None:
    raise errors.UsageError('config.data.manual_dir: the image folder to prepare; set --config.data.manual_dir=DIR.')
  if config.data.get('storage', 'memory') == 'prepared':  # Validate as the folder's reader, not the result.
    with config.unlocked():
      config.data.storage = 'stream'
  config_validation.validate(config)
  workers = image_folder.worker_count(FLAGS.workers)
  size = catalog.image_shape(config.data)[0]
  listing = image_folder.list_folder(config.data.manual_dir, config.data.get('class_map', None))
  listing = image_folder.preflight(listing, config.data.get('skip_unreadable', False))
  result = prepared.prepare(listing, size, out, workers=workers, draft=config.data.get('jpeg_draft', False),
                            part=part, chunk=prepared.default_chunk(size))
  print(json.dumps({'out': result.out, 'num_examples': result.num_examples, 'chunks': result.chunks,
                    'chunks_done': result.chunks_done, 'decoded_here': result.decoded_here,
                    'complete': result.complete}), flush=True)
  if result.complete:
    sys.stderr.write(f'Prepared. Train with --config.data.storage=prepared --config.data.prepared_dir={out}\n')
  else:
    sys.stderr.write(f'Part {part[0]}/{part[1]} done; {result.chunks - result.chunks_done} chunk(s) of other parts '
                     'remain: run the other parts (or this command with --part=0/1) to finish.\n')


if __name__ == '__main__':
  cli.run(main, define_flags)
