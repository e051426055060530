"""Worker processes that decode image files (data.decode_workers > 0), so that reading scales with the cores.

Threads share one interpreter: PIL releases the GIL while it decodes, but cropping, converting and stacking do
not, and one process tops out at a few hundred 64x64 images per second. `DecodePool` starts N plain Python
processes (`python -m cm_jax.data.decode_pool`, importing only numpy and PIL, not JAX) and splits each read
into N contiguous parts, one per worker; the images come back in the order asked for. What a read returns
depends only on the paths asked for, so the batch of step k stays a function of (seed, k) whatever the number
of workers.

Protocol (pipes, length-prefixed frames of bytes; nothing is pickled): the parent sends the paths joined by NUL
bytes; the worker answers b'K' and the raw uint8 pixels (n, size, size, 3), or b'E' and a message naming the
file it could not read. A worker ignores SIGINT and
SIGTERM (the trainer owns them: it saves and stops, and then closes the pool) and exits when its input
closes, so it also ends when the parent dies.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
from typing import Any, Optional, Sequence

import numpy as np

from cm_jax.runtime import errors

_LENGTH = struct.Struct('<Q')


class DecodeWorkerError(errors.UserError, RuntimeError):
  """A decode worker process died (killed, out of memory): the read cannot complete."""


def _send(stream: Any, frame: bytes) -> None:
  stream.write(_LENGTH.pack(len(frame)))
  stream.write(frame)
  stream.flush()


def _receive(stream: Any) -> Optional[bytes]:
  """The next frame, or None at the end of the stream."""
  header = stream.read(_LENGTH.size)
  if len(header) < _LENGTH.size:
    return None
  (length,) = _LENGTH.unpack(header)
  data = stream.read(length)
  if len(data) < length:
    return None
  return data


def _encode_paths(paths: Sequence[str]) -> bytes:
  return b'\0'.join(os.fsencode(p) for p in paths)


def _decode_paths(frame: bytes) -> list[str]:
  return [os.fsdecode(p) for p in frame.split(b'\0')]


def _package_root() -> str:
  import cm_jax  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.dirname(os.path.abspath(cm_jax.__file__)))


class DecodePool:
  """`workers` processes decoding image files to uint8 (size, size, 3) as image_folder.decode does."""

  def __init__(self, workers: int, size: int, draft: bool = False):
    if workers < 1:
      raise ValueError(f'DecodePool needs at least one worker, got {workers}.')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([_package_root()] + [p for p in [env.get('PYTHONPATH')] if p])
    command = [sys.executable, '-m', 'cm_jax.data.decode_pool', str(int(size)), '1' if draft else '0']
    self._shape = (int(size), int(size), 3)
    self._lock = threading.Lock()
    self._workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                     for _ in range(workers)]

  @property
  def num_workers(self) -> int:
    return len(self._workers)

  def _lost(self, worker: subprocess.Popen) -> DecodeWorkerError:
    try:
      code = worker.wait(timeout=5)
    except subprocess.TimeoutExpired:
      code = None
    how = (f'was killed by signal {-code}' if code is not None and code < 0 else
           f'exited with code {code}' if code is not None else 'stopped answering')
    return DecodeWorkerError(f'An image decode worker (process {worker.pid}) {how}, perhaps out of memory; the run '
                             'stops here. Lower data.decode_workers or free memory; a rerun resumes from the last '
                             'checkpoint.')

  def decode(self, paths: Sequence[str]) -> list[np.ndarray]:
    """The images of `paths`, in order. Raises ValueError naming an unreadable file (after every worker has
    answered, so the pool stays usable) or DecodeWorkerError if a worker died."""
    paths = list(paths)
    if not paths:
      return []
    with self._lock:
      if not self._workers:
        raise RuntimeError('DecodePool.decode after close().')
      parts = [part for part in np.array_split(np.arange(len(paths)), len(self._workers)) if len(part)]
      busy = self._workers[:len(parts)]
      for worker, part in zip(busy, parts):
        try:
          _send(worker.stdin, _encode_paths([paths[i] for i in part]))
        except (BrokenPipeError, OSError):
          raise self._lost(worker) from None
      images, problem = [], None
      for worker, part in zip(busy, parts):
        reply = _receive(worker.stdout)
        if reply is None:
          raise self._lost(worker)
        if reply[:1] == b'K':
          images.extend(np.frombuffer(reply, np.uint8, offset=1).reshape((len(part),) + self._shape))
        elif problem is None:
          problem = reply[1:].decode('utf-8', 'replace')
      if problem is not None:
        raise ValueError(problem)
      return images

  def close(self) -> None:
    """Ends the workers (their input closes; they exit) and waits for them."""
    with self._lock:
      workers, self._workers = self._workers, []
    for worker in workers:
      try:
        worker.stdin.close()
      except OSError:
        pass
    for worker in workers:
      try:
        worker.wait(timeout=30)
      except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
      worker.stdout.close()


def _serve(size: int, draft: bool) -> int:
  """A worker: decode each list of paths read from stdin, answer on stdout, until stdin closes."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  from cm_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  requests, replies = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # Anything printed must not corrupt the replies.
  while True:
    frame = _receive(requests)
    if frame is None:
      return 0
    try:
      images = [image_folder.decode(p, size, draft=draft) for p in _decode_paths(frame)]
      reply = b'K' + np.ascontiguousarray(np.stack(images), np.uint8).tobytes()
    except ValueError as e:
      reply = b'E' + str(e).encode('utf-8', 'replace')
    try:
      _send(replies, reply)
    except (BrokenPipeError, OSError):
      return 0


if __name__ == '__main__':
  sys.exit(_serve(int(sys.argv[1]), sys.argv[2] == '1'))
