"""README.md and docs/*.md stay true to the code: the README stays short, links resolve, commands use only the
flags their tools define and the config keys their configs have, and every path they name exists. The READMEs of
benchmarks/ and launch/ keep to the same wording, their links resolve and the module paths they name exist."""

import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, 'README.md')
PAGES = [README] + sorted(glob.glob(os.path.join(REPO_ROOT, 'docs', '*.md')))
# The READMEs next to the scripts (measurement history, launch scripts): users read them too.
SCRIPT_PAGES = [os.path.join(REPO_ROOT, folder, 'README.md') for folder in ('benchmarks', 'launch')]
TOOLS = ('train', 'sample', 'evaluate', 'edit', 'prepare')
MAX_README_LINES = 250

FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.S | re.M)
INLINE = re.compile(r'`([^`]+)`')
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
TOOL_CALL = re.compile(r'python -m cm_jax\.(\w+)')
HELP_FLAG = re.compile(r'^\s*(?:-\w,\s*)?--(\[no\])?([A-Za-z0-9_.-]+):', re.M)
FORBIDDEN = {
    'the word "issue"': re.compile(r'\bissues?\b', re.I),
    '"target N"': re.compile(r'\btargets?\s*#?\s*\d', re.I),
}
# Paths named anywhere in a page (prose, tables, code), checked against the repository.
CONFIG_PATH = re.compile(r'(?<![\w/.-])((?:cm_jax/)?configs/[A-Za-z0-9_]+\.py)')
BENCHMARK_PATH = re.compile(r'(?<![\w/.-])(benchmarks/[A-Za-z0-9_]+\.py)')
MODULE_PATH = re.compile(r'(?<![\w/.-])(cm_jax/(?:[A-Za-z0-9_]+/)*(?:[A-Za-z0-9_]+\.py|[A-Za-z0-9_]+/))')
TEST_PATH = re.compile(r'(?<![\w/.-])(?:tests/)?(test_[A-Za-z0-9_]+\.py)\b')


def read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def relative(path: str) -> str:
  return os.path.relpath(path, REPO_ROOT)


def code_lines(text: str) -> list[str]:
  """The commands of a page's code: each line of its fenced blocks (continuations joined), and each inline
  code span (fenced blocks removed first) as one line."""
  lines = []
  for block in FENCE.findall(text):
    lines += block.replace('\\\n', ' ').splitlines()
  return lines + [' '.join(span.split()) for span in INLINE.findall(FENCE.sub('', text))]


def tool_commands(line: str) -> list[tuple[str, list[str]]]:
  """(tool, argument tokens) of every `python -m cm_jax.TOOL ...` in one line of code."""
  commands = []
  for match in TOOL_CALL.finditer(line):
    rest = re.split(r'\s#|&&|;|\s\|', line[match.end():])[0]
    try:
      tokens = shlex.split(rest)
    except ValueError:
      tokens = rest.split()
    commands.append((match.group(1), tokens))
  return commands


def all_commands() -> list[tuple[str, str, list[str]]]:
  """(page, tool, tokens) of every tool command in the README and docs/."""
  return [(relative(page), tool, tokens) for page in PAGES for line in code_lines(read(page))
          for tool, tokens in tool_commands(line)]


def flag_value(tokens: list[str], name: str):
  for token in tokens:
    if token.startswith(f'--{name}='):
      return token.split('=', 1)[1]
  return None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config a `--config=PATH[:ARG]` flag names, loaded as the CLIs load it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(f'_docs_config_{abs(hash(spec))}',
                                                       os.path.join(REPO_ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


@pytest.fixture(scope='module')
def tool_flags() -> dict[str, tuple[set[str], set[str]]]:
  """Each tool's flags from one `--helpfull` run per tool: (all flag names, boolean flag names)."""
  procs = {tool: subprocess.Popen([sys.executable, '-m', f'cm_jax.{tool}', '--helpfull'], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for tool in TOOLS}
  flags = {}
  for tool, proc in procs.items():
    out, _ = proc.communicate(timeout=300)  # absl's --helpfull exits 0 or 1: only the text matters.
    found = HELP_FLAG.findall(out)
    own = 'out' if tool == 'prepare' else 'workdir'  # A flag the tool surely defines: its help was read.
    assert any(name == own for _, name in found), f'cm_jax.{tool} --helpfull listed no --{own}:\n{out[-3000:]}'
    flags[tool] = ({name for _, name in found}, {name for no, name in found if no})
  return flags


def test_readme_is_at_most_250_lines():
  lines = read(README).count('\n')
  assert lines <= MAX_README_LINES, f'README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES}).'


def test_every_relative_link_points_to_an_existing_file():
  broken = []
  for page in PAGES + SCRIPT_PAGES:
    for target in LINK.findall(read(page)):
      if target.startswith(('http://', 'https://', 'mailto:', '#')):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), target.split('#')[0]))
      if not os.path.exists(path):
        broken.append(f'{relative(page)}: ({target}) -> {relative(path)} does not exist')
  assert not broken, '\n'.join(broken)


def test_no_page_uses_issue_numbers_or_target_numbers():
  found = []
  for page in PAGES + SCRIPT_PAGES:
    for number, line in enumerate(read(page).splitlines(), 1):
      for what, pattern in FORBIDDEN.items():
        if pattern.search(line):
          found.append(f'{relative(page)}:{number}: {what}: {line.strip()}')
  assert not found, 'Write for users, not as a diary:\n' + '\n'.join(found)


def test_the_pages_show_commands_of_every_tool():
  assert {tool for _, tool, _ in all_commands()} >= set(TOOLS)


def test_every_cli_command_names_an_existing_tool():
  unknown = [f'{page}: python -m cm_jax.{tool}' for page, tool, _ in all_commands()
             if tool not in TOOLS or not os.path.exists(os.path.join(REPO_ROOT, 'cm_jax', f'{tool}.py'))]
  assert not unknown, '\n'.join(unknown)


def test_every_cli_command_uses_only_flags_its_tool_defines(tool_flags):
  bad = []
  for page, tool, tokens in all_commands():
    if tool not in tool_flags:
      continue
    names, booleans = tool_flags[tool]
    for token in tokens:
      if not token.startswith('--'):
        continue
      name = token[2:].split('=', 1)[0]
      if name.startswith('config.'):
        continue  # Checked against the config file below.
      if name in names or (name.startswith('no') and name[2:] in booleans):
        continue
      bad.append(f'{page}: cm_jax.{tool} has no flag {token}')
  assert not bad, '\n'.join(bad)


def test_every_config_override_names_a_key_of_its_config():
  bad = []
  configs = {}
  for page, tool, tokens in all_commands():
    overrides = [t[2:].split('=', 1)[0][len('config.'):] for t in tokens if t.startswith('--config.')]
    if not overrides:
      continue
    spec = flag_value(tokens, 'config')
    if spec is None:
      bad.append(f'{page}: cm_jax.{tool} overrides {overrides} without --config=')
      continue
    if not os.path.exists(os.path.join(REPO_ROOT, spec.partition(':')[0])):
      continue  # Reported by test_every_config_file_named_exists.
    if spec not in configs:
      configs[spec] = load_config(spec)
    bad += [f'{page}: {spec} has no field {key}' for key in overrides if not has_key(configs[spec], key)]
  assert not bad, '\n'.join(bad)


def test_every_config_file_named_exists():
  missing = []
  for page in PAGES:
    text = read(page)
    for path in CONFIG_PATH.findall(text):
      if not os.path.exists(os.path.join(REPO_ROOT, path)):
        missing.append(f'{relative(page)}: {path}')
  for page, tool, tokens in all_commands():
    for flag, where in (('config', '{}'), ('eval_config', 'cm_jax/configs/{}.py')):
      value = flag_value(tokens, flag)
      if value is not None and not os.path.exists(os.path.join(REPO_ROOT, where.format(value.partition(':')[0]))):
        missing.append(f'{page}: cm_jax.{tool} --{flag}={value}')
  assert not missing, '\n'.join(missing)


def test_every_benchmark_script_named_exists():
  missing = [f'{relative(page)}: {path}' for page in PAGES for path in BENCHMARK_PATH.findall(read(page))
             if not os.path.exists(os.path.join(REPO_ROOT, path))]
  assert not missing, '\n'.join(missing)


def test_every_module_path_named_exists():
  missing = [f'{relative(page)}: {path}' for page in PAGES + SCRIPT_PAGES for path in MODULE_PATH.findall(read(page))
             if not os.path.exists(os.path.join(REPO_ROOT, path))]
  assert not missing, '\n'.join(missing)


def test_every_test_file_named_exists():
  missing = [f'{relative(page)}: tests/{name}' for page in PAGES for name in TEST_PATH.findall(read(page))
             if not os.path.exists(os.path.join(REPO_ROOT, 'tests', name))]
  assert not missing, '\n'.join(missing)
