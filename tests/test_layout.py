"""The package's shape, read from its imports: three wings and a flat spine, no import back up the layers."""

import ast
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, 'cm_jax')
CLIS = {'cm_jax.train', 'cm_jax.sample', 'cm_jax.evaluate', 'cm_jax.edit'}
# What each part of the package may import from cm_jax (besides itself). The layers, bottom up: runtime and
# configs; models and the pure maths (core); data; samplers; evaluation; training and the notebook API;
# the four command-line tools.
ALLOWED = {
    'cm_jax.runtime': {'cm_jax.configs'},
    'cm_jax.configs': set(),
    'cm_jax.models': set(),
    'cm_jax.core': {'cm_jax.models'},
    'cm_jax.data': {'cm_jax.runtime', 'cm_jax.core'},
    'cm_jax.input_pipeline': {'cm_jax.data', 'cm_jax.core', 'cm_jax.runtime'},
    'cm_jax.evaluation': {'cm_jax.runtime', 'cm_jax.core', 'cm_jax.data', 'cm_jax.input_pipeline',
                          'cm_jax.configs', 'cm_jax.samplers'},
    'cm_jax.samplers': {'cm_jax.runtime', 'cm_jax.core', 'cm_jax.models'},
}


def modules():
  """{module name: set of cm_jax modules it imports} for every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
      imported = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
          imported.update(a.name for a in node.names if a.name.startswith('cm_jax'))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('cm_jax'):
          # `from cm_jax import x` and `from cm_jax.core import x` import the submodule x.
          imported.update(f'{node.module}.{a.name}' if node.module.count('.') < 2 else node.module
                          for a in node.names)
      out[module] = imported
  return out


def part(module: str) -> str:
  """The wing or spine module a module belongs to: 'cm_jax.core', 'cm_jax.train', ..."""
  return '.'.join(module.split('.')[:2])


def test_the_top_level_keeps_training_the_clis_and_the_notebook_api_only():
  top = sorted(n[:-3] for n in os.listdir(PACKAGE) if n.endswith('.py') and n != '__init__.py')
  assert top == ['checkpointing', 'config_validation', 'edit', 'evaluate', 'inference', 'input_pipeline',
                 'prepare', 'sample', 'samplers', 'teacher', 'train', 'train_state', 'train_step']
  for wing in ('core', 'evaluation', 'runtime', 'data', 'models', 'configs'):
    assert os.path.isfile(os.path.join(PACKAGE, wing, '__init__.py')), wing


def test_no_module_imports_a_command_line_tool():
  for module, imported in modules().items():
    assert not (imported & CLIS) - {module}, f'{module} imports the CLI module(s) {imported & CLIS}'


@pytest.mark.parametrize('wing', sorted(ALLOWED))
def test_no_import_runs_back_up_the_layers(wing):
  for module, imported in modules().items():
    if part(module) != wing:
      continue
    outside = {part(m) for m in imported} - {wing, 'cm_jax'} - ALLOWED[wing]
    assert not outside, f'{module} imports {sorted(outside)}, above its layer'


def test_training_builds_its_network_and_samplers_without_the_notebook_api():
  imported = modules()
  for module in ('cm_jax.train', 'cm_jax.train_step', 'cm_jax.train_state', 'cm_jax.samplers'):
    assert 'cm_jax.inference' not in imported[module], module


def test_the_notebook_api_only_composes_samplers_and_checkpoints():
  imported = {part(m) for m in modules()['cm_jax.inference']}
  assert imported <= {'cm_jax.samplers', 'cm_jax.checkpointing', 'cm_jax.train_state', 'cm_jax.core',
                      'cm_jax.data', 'cm_jax.runtime'}, imported


def test_each_confusable_pair_says_which_is_which_in_its_first_line():
  first = {name: ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, name)).read())).splitlines()[0]
           for name in ('sample.py', 'samplers.py', 'inference.py', 'edit.py', 'evaluate.py',
                        'core/sampling.py', 'core/editing.py', 'runtime/images.py', 'core/pixels.py')}
  assert 'CLI' in first['sample.py'] and 'CLI' in first['edit.py'] and 'CLI' in first['evaluate.py'], first
  assert 'Notebook API' in first['inference.py'], first
  assert 'maths' in first['core/sampling.py'].lower() and 'maths' in first['core/editing.py'].lower(), first
  assert 'png' in first['runtime/images.py'].lower() and 'pixel' in first['core/pixels.py'].lower(), first
