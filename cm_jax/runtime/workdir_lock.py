"""One writer per workdir: WORKDIR/LOCK.json names the run that holds it and is kept fresh by a heartbeat.

A second trainer on a busy workdir is refused with the holder's host, pid and start time. A lock left by a
killed run does not stay stuck: on the same host it is free once its pid is gone, on any host once its
heartbeat is older than `stale_s`. In a multi-process run process 0 holds the lock for all processes, and
every process learns whether it got it.

Local workdirs take the lock atomically (O_EXCL); on gs:// the check and the write are two requests, so two
runs started within the same second may both get it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from absl import logging
from etils import epath

from cm_jax.runtime import errors
from cm_jax.runtime import multihost
from cm_jax.runtime import paths

LOCK_NAME = 'LOCK.json'


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's live process.
    return True
  return True


class WorkdirLock:
  """Context manager: holds WORKDIR/LOCK.json while training runs."""

  def __init__(self, workdir: str, heartbeat_s: float = 30.0, stale_s: float = 300.0,
               clock: Callable[[], float] = time.time):
    self.path = epath.Path(paths.absolute(workdir)) / LOCK_NAME
    self.heartbeat_s, self.stale_s, self.clock = heartbeat_s, stale_s, clock
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._held = False

  # ----------------------------------------------------------------------------------------------
  def _record(self) -> dict:
    now = self.clock()
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'token': self.token, 'started': self._started,
            'heartbeat': now, 'command': ' '.join(sys.argv)}

  def _write(self, exclusive: bool) -> bool:
    """Writes our record; with exclusive, only if no lock file exists (False then)."""
    data = json.dumps(self._record(), indent=1).encode()
    if paths.is_remote(self.path):
      if exclusive and self.path.exists():
        return False
      self.path.write_bytes(data)
      return True
    if not exclusive:
      tmp = f'{self.path}.{self.token}.tmp'
      with open(tmp, 'wb') as f:
        f.write(data)
      os.replace(tmp, self.path)
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True

  def _holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_bytes())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # Half-written by a run killed while writing it.
      return {}

  def _stale(self, holder: dict) -> Optional[str]:
    """Why the holder's lock no longer counts, or None while it does."""
    if not holder:
      return 'unreadable lock file'
    if holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1))):
      return f'process {holder.get("pid")} is gone'
    age = self.clock() - float(holder.get('heartbeat', 0))
    if age > self.stale_s:
      return f'no heartbeat for {age:.0f} s'
    return None

  def _takeover_advice(self, holder: dict) -> str:
    """When the lock of a run that is gone frees itself, and the command that frees it now."""
    left = max(0.0, self.stale_s - (self.clock() - float(holder.get('heartbeat', 0))))
    remove = (f'gcloud storage rm {self.path}' if paths.is_remote(self.path) else f'rm {self.path}')
    elsewhere = holder.get('host') != socket.gethostname()
    return (f'If that run is gone{" (its host " + str(holder.get("host")) + " stopped or was recreated)" if elsewhere else ""}, '
            f'its lock is taken over automatically {self.stale_s:.0f} s after its last heartbeat (in {left:.0f} s); '
            f'to take over at once, run `{remove}` and start again.')

  def _describe(self, holder: dict) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0))))
    return (f'host {holder.get("host")}, pid {holder.get("pid")}, started {started}, last heartbeat '
            f'{self.clock() - float(holder.get("heartbeat", 0)):.0f} s ago ({holder.get("command", "")!r})')

  def acquire(self) -> None:
    """Takes the lock on this process or raises WorkdirBusyError naming the holder."""
    self._started = self.clock()
    # A run that fails before writing anything (bad data, say) leaves no empty workdir behind.
    self._created_dir = not paths.is_remote(self.path) and not self.path.parent.exists()
    paths.makedirs(self.path.parent)
    for _ in range(3):  # A stale lock is removed and the exclusive create retried.
      if self._write(exclusive=True):
        self._held = True
        return
      holder = self._holder()
      if holder is None:
        continue  # Released meanwhile.
      reason = self._stale(holder)
      if reason is None:
        raise WorkdirBusyError(
            f'{self.path.parent} is in use by another run ({self._describe(holder)}). Wait for it to end, stop '
            f'it, or use another --workdir. {self._takeover_advice(holder)}')
      logging.warning('Taking over the lock %s of a run that stopped without releasing it (%s).', self.path,
                      reason)
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
    raise WorkdirBusyError(f'Could not take the lock {self.path}: other runs keep taking it.')

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      holder = self._holder()
      if holder and holder.get('token') != self.token:
        logging.error('The workdir lock %s was taken over by another run (%s); this run keeps writing.',
                      self.path, self._describe(holder))
        return
      try:
        self._write(exclusive=False)
      except OSError as e:  # A full disk: keep training, the next beat retries.
        logging.warning('Could not refresh the workdir lock %s: %s', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._held:
      holder = self._holder()
      if holder and holder.get('token') == self.token:
        self.path.unlink()
      self._held = False
      if getattr(self, '_created_dir', False):
        try:
          os.rmdir(os.fspath(self.path.parent))  # Only if empty (local workdirs only).
        except OSError:
          pass

  # ----------------------------------------------------------------------------------------------
  def __enter__(self) -> 'WorkdirLock':
    # Process 0 takes the lock; every process ends with its error if that fails (busy, unwritable, ...).
    multihost.on_process_zero(self.acquire)
    if self._held:
      self._thread = threading.Thread(target=self._beat, name='cm_jax_workdir_lock', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
