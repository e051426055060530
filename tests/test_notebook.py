"""examples/quickstart.ipynb runs end to end (nbclient, kernel python3) on a tiny trained Fashion-MNIST run."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import nbformat
from nbclient import NotebookClient
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, 'examples', 'quickstart.ipynb')


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """4 CT steps of configs/test.py on the real Fashion-MNIST IDX files, trained by the CLI as the notebook's
  first markdown cell says."""
  workdir = str(tmp_path_factory.mktemp('notebook_run'))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  result = subprocess.run([sys.executable, '-m', 'cm_jax.train', '--config=configs/test.py', f'--workdir={workdir}'],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def python3_is_this_interpreter(tmp_path, monkeypatch):
  """Kernel spec 'python3' runs sys.executable: $JUPYTER_PATH outranks every other kernel spec directory, and a
  user-level spec (`ipykernel install --user`) may name another Python, without cm_jax."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Python 3', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))


def outputs_of(nb, cell_id):
  return next(cell for cell in nb.cells if cell.get('id') == cell_id).outputs


def text_of(outputs) -> str:
  return ''.join(out.get('text', '') for out in outputs if out.output_type == 'stream')


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_notebook_samples_edits_and_scores(tiny_run, python3_is_this_interpreter, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits conftest's XLA_FLAGS (two fake CPU devices) and the session's compilation cache.
  env = dict(os.environ, CM_JAX_WORKDIR=tiny_run, CM_JAX_EVAL_NUM='16', CM_JAX_CACHE=str(tmp_path / 'cache'),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  client = NotebookClient(nb, kernel_name='python3', timeout=600, resources={'metadata': {'path': REPO_ROOT}})
  client.execute(env=env)  # Raises CellExecutionError, with the cell's traceback, if a cell fails.

  assert f'{tiny_run}: checkpoint step 4' in text_of(outputs_of(nb, 'load'))
  for cell_id in ('one-step', 'two-step', 'inpaint'):
    images = [out for out in outputs_of(nb, cell_id) if 'image/png' in out.get('data', {})]
    assert len(images) == 1, f'cell {cell_id!r} displayed {len(images)} images'
  assert '(64, 28, 28, 1) uint8' in text_of(outputs_of(nb, 'one-step'))
  scores = text_of(outputs_of(nb, 'evaluate'))
  distances = re.findall(r'(\d)-step sampling, 16 samples: Frechet distance \(classifier_fd\) (\S+),', scores)
  assert [steps for steps, _ in distances] == ['1', '2'], scores
  assert all(math.isfinite(float(fd)) and float(fd) >= 0 for _, fd in distances), scores
  assert os.listdir(tmp_path / 'cache')  # The classifier and reference features went to $CM_JAX_CACHE.
