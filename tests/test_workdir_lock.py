"""One writer per workdir: WORKDIR/LOCK.json, its holder, its heartbeat and stale locks."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cm_jax import train
from cm_jax.configs import test as test_config
from cm_jax.runtime import workdir_lock


def write_holder(workdir, **fields):
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'token': 'other', 'started': time.time(),
            'heartbeat': time.time(), 'command': 'python -m cm_jax.train --workdir=elsewhere'}
  record.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME), 'w') as f:
    json.dump(record, f)


def dead_pid() -> int:
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def test_second_holder_is_refused_naming_the_first_and_the_lock_is_released(tmp_path):
  path = tmp_path / workdir_lock.LOCK_NAME
  with workdir_lock.WorkdirLock(str(tmp_path)):
    holder = json.loads(path.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'pid {os.getpid()}.*another --workdir'):
      with workdir_lock.WorkdirLock(str(tmp_path)):
        pass
    assert path.exists()  # The refused one did not remove the holder's lock.
  assert not path.exists()


def test_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      raise KeyboardInterrupt
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_lock_of_a_killed_process_on_this_host_is_taken_over(tmp_path):
  write_holder(tmp_path, pid=dead_pid())
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())['token'] == lock.token


@pytest.mark.parametrize('age,busy', [(10, True), (1000, False)])
def test_lock_of_another_host_counts_until_its_heartbeat_is_stale(tmp_path, age, busy):
  write_holder(tmp_path, host='elsewhere', pid=1, heartbeat=time.time() - age)
  lock = workdir_lock.WorkdirLock(str(tmp_path), stale_s=300)
  if busy:
    with pytest.raises(workdir_lock.WorkdirBusyError, match='host elsewhere, pid 1'):
      lock.__enter__()
  else:
    with lock:
      pass


def test_unreadable_lock_file_is_taken_over(tmp_path):
  (tmp_path / workdir_lock.LOCK_NAME).write_text('{"host": ')  # Killed while writing it.
  with workdir_lock.WorkdirLock(str(tmp_path)):
    pass


def test_heartbeat_refreshes_the_lock(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    first = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())['heartbeat']
    deadline = time.time() + 10
    while json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())['heartbeat'] == first:
      assert time.time() < deadline, 'the heartbeat never refreshed the lock'
      time.sleep(0.02)


def test_trainer_on_a_busy_workdir_is_refused_before_writing_anything(tmp_path):
  write_holder(tmp_path, host='elsewhere', pid=1)
  config = test_config.get_config()
  config.data.name, config.data.source = 'fashion_mnist', 'local'
  with pytest.raises(workdir_lock.WorkdirBusyError, match='in use by another run'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME]
