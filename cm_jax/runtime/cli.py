"""What every cm_jax command-line tool shares: flag parsing, one-line errors, exit codes, quiet logs.

    if __name__ == '__main__':
      cli.run(main, define_flags)

- A user error (a bad flag, config value, path or file; see cm_jax/runtime/errors.py) ends with one line on stderr,
  `cm_jax.sample: error: ...`, and exit code 2 (usage) or 1 (failure); --verbose adds the traceback.
  Errors that cm_jax itself raises about its input (ValueError, FileNotFoundError, FloatingPointError from
  cm_jax's own code) count as user errors too; anything raised elsewhere is a bug and keeps its traceback.
- A second Ctrl-C (the first one stops training cleanly, see multihost.StopSignal) exits 130 with one line; the
  other tools stop at the first. SIGINT works even when the tool was started with it ignored (in the background
  of a shell script).
- Logs: cm_jax's own INFO lines (progress, what was loaded and written) and every library's warnings show;
  library INFO lines (Orbax, TFDS, absl, TensorFlow's C++ start-up lines) only with --verbose.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging as pylogging
import os
import signal
import sys
import tempfile
import traceback
from typing import Callable, Optional, Sequence

# TensorFlow (TFDS, the Inception network) reads this when it is first imported: hide its C++ INFO lines.
if not any(a == '--verbose' or a.lower() in ('--verbose=true', '--verbose=1') for a in sys.argv):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from cm_jax.runtime import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from cm_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
# The whole cm_jax package (this module lives in cm_jax/runtime/): its errors are user errors, its log lines kept.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Library modules whose INFO lines are the training log itself: metric values, and steps/s with the ETA.
_KEPT_LIBRARY_INFO = (os.sep + os.path.join('clu', 'metric_writers') + os.sep,
                      os.sep + os.path.join('clu', 'periodic_actions.py'))
# Library warnings that say nothing to a user: Orbax on every read-only checkpoint manager (sample, edit, ...).
_LIBRARY_NOISE = ('Given directory is read only', 'read_only=True, setting save_interval_steps=0',
                  'has no dataset_info.json')  # TFDS, while cm_jax looks for prepared data before local files.
# clu's console copies of what goes to TensorBoard anyway: the whole flattened config, and image shapes.
_CLU_NOISE = ('[Hyperparameters]', 'Got images')
_quiet = False  # Set by configure_logging: the CLIs hide native libraries' start-up lines too.
# OS errors that are the environment's, not cm_jax's: reported in one line naming the path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                       errno.ENOTDIR, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG}
_USER_ERROR_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def program_name() -> str:
  """'cm_jax.train' for `python -m cm_jax.train`, else the script's name."""
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'cm_jax'


def one_line(text: str) -> str:
  return ' '.join(str(text).split())


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def run(main: Callable[[list[str]], None], define_flags: Optional[Callable[[], None]] = None) -> None:
  """Defines the tool's flags and --verbose, parses them, and runs main(argv) with cm_jax's error handling."""
  if define_flags is not None:
    define_flags()
  if 'verbose' not in FLAGS:
    flags.DEFINE_bool('verbose', False, 'Show library INFO logs, and the traceback of a user error.')
  xla_note = xla_flags.apply()  # Before any computation starts a JAX backend.
  app.run(lambda argv: _run_main(main, argv, xla_note), flags_parser=parse_flags)


def _run_main(main: Callable[[list[str]], None], argv: list[str], xla_note: str = '') -> None:
  verbose = FLAGS.verbose
  configure_logging(verbose)
  if 'seed' in FLAGS and FLAGS.seed is not None and not 0 <= FLAGS.seed < 2 ** 63:
    fail(f'--seed={FLAGS.seed} is out of range: a seed is an integer from 0 to 2**63 - 1.', errors.USAGE)
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background by a shell script, the process inherits SIGINT as ignored: `kill -INT` must
    # stop it all the same, as Ctrl-C does (the trainer installs its own handler on top of this one).
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if xla_note:
    logging.info('%s', xla_note)
  try:
    main(argv)
  except KeyboardInterrupt:
    if verbose:
      traceback.print_exc()
    fail('interrupted (training: a second Ctrl-C stops at once, without saving; the last saved checkpoint is '
         'kept).' if program_name() == 'cm_jax.train' else 'interrupted.', 130, at_once=True)
  except Exception as e:  # pylint: disable=broad-except
    lost = _lost_peer_reason(e)
    if lost:  # Without jax.distributed's shutdown, which would wait for the lost process, then abort.
      if verbose:
        traceback.print_exc()
      from cm_jax.runtime import multihost  # pylint: disable=g-import-not-at-top
      multihost.lost_process_exit(lost)
    code = user_error_code(e)
    if code is None:
      raise
    if verbose:  # The traceback, then the same line and exit code as without --verbose.
      traceback.print_exc()
    fail(describe(e), code, at_once=True)


def fail(message: str, code: int, at_once: bool = False, skip_shutdown: bool = False) -> None:
  """Prints `PROGRAM: error: MESSAGE` as one line on stderr and exits with `code`.

  at_once: exit without the interpreter's shutdown (os._exit), whose clean-up of background threads that the
  failure left behind (a checkpoint write refused by a full disk has a dozen) prints their errors after ours.
  Callers use it only once their own clean-up (waiting for saves, closing files) has run. A multi-process run
  still exits normally then, to shut jax.distributed down, unless `skip_shutdown` (another process is gone: the
  shutdown would wait for it, then abort).
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  sys.stderr.write(f'{program_name()}: error: {one_line(message)}\n')
  sys.stderr.flush()
  if skip_shutdown or (at_once and not _distributed()):
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _lost_peer_reason(e: BaseException) -> Optional[str]:
  if not _distributed():
    return None
  from cm_jax.runtime import multihost  # pylint: disable=g-import-not-at-top
  return multihost.lost_peer_reason(e)


def _distributed() -> bool:
  jax = sys.modules.get('jax')
  try:
    return jax is not None and jax.distributed.is_initialized()
  except Exception:  # pylint: disable=broad-except
    return True  # When in doubt, the ordinary exit.


def user_error_code(e: BaseException) -> Optional[int]:
  """The exit code of a user error, or None for a program bug (which keeps its traceback)."""
  if isinstance(e, errors.UserError):
    return e.exit_code
  if isinstance(e, (app.UsageError, flags.Error)):
    return errors.USAGE
  if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS and e.filename:
    return errors.FAILURE
  if isinstance(e, _USER_ERROR_TYPES) and raised_by_cm_jax(e):
    return errors.FAILURE
  return None


def raised_by_cm_jax(e: BaseException) -> bool:
  """True if e was raised by a `raise` statement of cm_jax's own code: a message cm_jax wrote on purpose.

  The innermost frame alone is not enough: JAX removes its own frames from tracebacks, and errors of builtins
  (int('x'), np.concatenate([])) have no Python frame, so both would seem to come from the cm_jax line that
  called them; such errors are bugs and keep their traceback.
  """
  frames = traceback.extract_tb(e.__traceback__)
  if not frames or not os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep):
    return False
  return (frames[-1].line or '').lstrip().startswith('raise ')


def describe(e: BaseException) -> str:
  if isinstance(e, OSError) and not isinstance(e, errors.UserError) and e.filename:
    return f'{e.filename}: {e.strerror or e}{_os_error_hint(e)}'
  return str(e) or type(e).__name__


def _os_error_hint(e: OSError) -> str:
  if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    return '. Free space there (or choose another directory) and run again; the last saved checkpoint is kept.'
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return '. Make it writable, or choose another path.'
  return '.'


# --------------------------------------------------------------------------------------------------
# Flags and config files
# --------------------------------------------------------------------------------------------------
def parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv), with every parse error as one line (exit 2) naming the flag and, for configs, the file."""
  config_path = _config_file_argument(argv)
  if config_path is not None and 'config' in FLAGS:
    if not os.path.isfile(config_path):
      fail(f'--config={config_path}: no such file. Give the path of a config file, e.g. '
           '--config=configs/fashion_mnist_ct.py (see cm_jax/configs/).', errors.USAGE)
    for field in _config_overrides(argv):  # Checked here: ml_collections reports them as bare KeyErrors.
      if field not in _default_fields():
        fail(f'--config.{field}: the config has no field {field!r}.{suggest_field(field)}', errors.USAGE)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(str(e), errors.USAGE)
  except SyntaxError as e:
    fail(f'--config={config_path}: line {e.lineno}: {e.msg}. Fix the config file.', errors.USAGE)
  except (AttributeError, KeyError) as e:
    if config_path is None:
      raise
    fail(_config_attribute_error(e, argv, config_path), errors.USAGE)
  except Exception as e:  # pylint: disable=broad-except
    if config_path is None or not _raised_in_file(e, config_path):
      raise
    fail(f'--config={config_path}: get_config() raised {type(e).__name__}: {e}', errors.USAGE)
  if config_path is not None and 'config' in FLAGS:
    problem = config_structure_problem(FLAGS.config)
    if problem:
      fail(f'--config={config_path}: {problem}', errors.USAGE)
  return rest


def _config_file_argument(argv: Sequence[str]) -> Optional[str]:
  """The file part of --config=FILE[:ARG] (the last one given), or None."""
  path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      path = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return None if path is None else path.split(':', 1)[0]


def _raised_in_file(e: BaseException, path: str) -> bool:
  target = os.path.abspath(path)
  return any(os.path.abspath(f.filename) == target for f in traceback.extract_tb(e.__traceback__))


def _config_overrides(argv: Sequence[str]) -> list[str]:
  """The dotted fields of --config.FIELD=VALUE arguments."""
  return [a[len('--config.'):].split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]


def _config_attribute_error(e: Exception, argv: Sequence[str], config_path: str) -> str:
  message = str(e.args[0]) if e.args else str(e)
  if 'get_config' in message:
    return (f'--config={config_path} defines no get_config(); a config file defines get_config() returning an '
            'ml_collections.ConfigDict (start from cm_jax.configs.default.get_config()).')
  problem = _structure_problem_of_file(config_path)
  if problem:  # Overrides failed because get_config() returned no config at all: say that, not the symptom.
    return f'--config={config_path}: {problem}'
  return f'--config={config_path} {_config_overrides(argv)}: {type(e).__name__}: {one_line(message)}'


def _structure_problem_of_file(config_path: str) -> Optional[str]:
  """config_structure_problem of what the config file's get_config() returns (None if that cannot be run)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.spec_from_file_location('_cm_jax_config_check', config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_structure_problem(module.get_config())
  except Exception:  # pylint: disable=broad-except
    return None


def suggest_field(field: str) -> str:
  """' Did you mean optim.lr?' for a misspelt dotted field (among cm_jax's default config), or the fields of
  its section, or ''."""
  known = list(_default_fields())
  section, _, last = field.rpartition('.')
  siblings = sorted(k[len(section) + 1:] for k in known if section and k.startswith(section + '.')
                    and '.' not in k[len(section) + 1:])
  close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
  if close:
    return f' Did you mean {section}.{close[0]}?'
  if siblings:
    return f' The fields of {section} are: {", ".join(siblings)}.'
  close = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
  return f' Did you mean {close[0]}?' if close else ''


def _default_fields() -> dict:
  from cm_jax.configs import common as config_lib  # pylint: disable=g-import-not-at-top
  from cm_jax.configs import default  # pylint: disable=g-import-not-at-top
  return config_lib.flatten_dict(default.get_config().to_dict())


def config_structure_problem(config) -> Optional[str]:
  """Why `config` is not a cm_jax config (not a ConfigDict, or fields missing or unknown), or None."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    return (f'get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict; start from '
            'cm_jax.configs.default.get_config() and change fields.')
  from cm_jax.configs import common as config_lib  # pylint: disable=g-import-not-at-top
  fields = config_lib.flatten_dict(config.to_dict())
  known = _default_fields()
  # A section holding a dict-valued leaf (none today) would flatten deeper; compare on the default's keys.
  missing = sorted(k for k in known if k not in fields)
  unknown = sorted(k for k in fields if k not in known)
  if missing:
    return (f'the config lacks the field(s) {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}; start '
            'from cm_jax.configs.default.get_config() and change fields rather than building a config anew.')
  if unknown:
    return (f'unknown config field(s) {", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}.'
            f'{suggest_field(unknown[0])}')
  return None


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------
def configure_logging(verbose: bool) -> None:
  """Hides library INFO lines unless `verbose` (see the module docstring)."""
  global _quiet
  _quiet = not verbose
  if verbose:
    return
  sys.unraisablehook = _one_line_unraisable
  handler = logging.get_absl_handler()
  for f in list(handler.filters):
    if getattr(f, 'cm_jax_quiet', False):
      handler.removeFilter(f)
  handler.addFilter(_QuietLibraries())
  python_handler = getattr(handler, 'python_handler', handler)
  if not isinstance(python_handler.formatter, _NoLibraryTracebacks):
    python_handler.setFormatter(_NoLibraryTracebacks(python_handler.formatter))


def _one_line_unraisable(unraisable) -> None:
  """Errors Python cannot raise anywhere (in callbacks of native threads, e.g. 'Event loop is closed' after a
  failed checkpoint write) as one warning line instead of a traceback each."""
  text = f'{type(unraisable.exc_value).__name__}: {one_line(str(unraisable.exc_value))[:200]}'
  if text not in _UNRAISABLE_SEEN:  # Once each: a failed write raises the same one in every pending callback.
    _UNRAISABLE_SEEN.add(text)
    logging.warning('Ignored an error in a background callback (further copies not shown): %s', text)


_UNRAISABLE_SEEN: set = set()


class _NoLibraryTracebacks(pylogging.Formatter):
  """Formats a library's error as its one-line message: its traceback (often dozens per failure, from every
  background thread of a failed checkpoint write) only with --verbose. The record itself is left as it is, for
  any other handler."""

  def __init__(self, inner: Optional[pylogging.Formatter]):
    super().__init__()
    self.inner = inner or pylogging.Formatter()

  def format(self, record) -> str:
    if not record.exc_info or os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep):
      return self.inner.format(record)
    saved = record.exc_info, record.exc_text, record.stack_info
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    try:
      return self.inner.format(record)
    finally:
      record.exc_info, record.exc_text, record.stack_info = saved


class _QuietLibraries:
  """logging.Filter: keeps warnings and errors, and INFO lines from cm_jax or clu's training log."""
  cm_jax_quiet = True

  def filter(self, record) -> bool:
    path = os.path.abspath(record.pathname)
    if path.startswith(PACKAGE_DIR + os.sep):
      return True
    if record.levelno >= 30:
      return not any(noise in str(record.msg) for noise in _LIBRARY_NOISE)
    if not any(part in path for part in _KEPT_LIBRARY_INFO):
      return False
    try:
      message = record.getMessage()
    except (TypeError, ValueError):
      return True
    return not any(noise in message for noise in _CLU_NOISE)


@contextlib.contextmanager
def native_stderr_hidden():
  """In a quiet CLI run, hides what native code writes to stderr meanwhile (TensorFlow's start-up lines when
  it is imported); Python errors still propagate. A no-op with --verbose and outside the CLIs."""
  if not _quiet:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  hidden = tempfile.TemporaryFile()
  failed = True
  try:
    os.dup2(hidden.fileno(), 2)
    yield
    failed = False
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    if failed:  # What was hidden may explain the failure: show it.
      hidden.seek(0)
      sys.stderr.write(hidden.read().decode(errors='replace'))
    hidden.close()


# --------------------------------------------------------------------------------------------------
# Checks before long work
# --------------------------------------------------------------------------------------------------
def parse_floats(flag: str, values: Optional[Sequence[str]]) -> Optional[list[float]]:
  """--ts=0.8,0.3 as floats (None stays None); a value that is not a number is a usage error naming the flag."""
  return None if values is None else _parse_list(flag, values, float, 'a number', '0.8,0.3')


def parse_ints(flag: str, values: Sequence[str]) -> list[int]:
  """--steps=1,2 as ints; anything else is a usage error naming the flag."""
  return _parse_list(flag, values, int, 'an integer', '1,2')


def _parse_list(flag: str, values: Sequence[str], kind: Callable, what: str, example: str) -> list:
  out = []
  for v in values:
    try:
      out.append(kind(v))
    except ValueError:
      raise errors.UsageError(f'--{flag}={",".join(values)}: {v!r} is not {what}; give a comma-separated list, '
                              f'e.g. --{flag}={example}.') from None
  return out


_UNWRITABLE_FIX = 'choose a directory you can write to, or fix its permissions or free space.'


def check_writable_dir(path: str, what: str) -> None:
  """Checks, before any long work starts, that files can be written in the directory `path`; `what` names it
  in the message (e.g. '--workdir'). URIs (gs://...) are left to the first write."""
  reason = _unwritable_dir_reason(path)
  if reason:
    raise errors.OutputPathError(f'{what}={path} is not writable ({reason}): {_UNWRITABLE_FIX}')


def check_writable_file(path: str, what: str) -> None:
  """Checks that the file `path` can be created (its folder exists or can be made, and is writable)."""
  from cm_jax.runtime import paths  # pylint: disable=g-import-not-at-top
  if paths.is_remote(path):
    return
  if os.path.isdir(path):
    raise errors.OutputPathError(f'{what}={path} is a directory; give a file path.')
  folder = os.path.dirname(os.path.abspath(path))
  reason = _unwritable_dir_reason(folder)
  if reason:
    raise errors.OutputPathError(f'{what}={path}: its folder {folder} is not writable ({reason}): {_UNWRITABLE_FIX}')


def _unwritable_dir_reason(path: str) -> Optional[str]:
  """Why no file can be written in the directory `path`, or None when one can (or it is a URI).

  An existing directory gets a probe file written and removed; a missing one is not created (a failing run
  leaves nothing behind): its nearest existing parent must be writable.
  """
  from cm_jax.runtime import paths  # pylint: disable=g-import-not-at-top
  if paths.is_remote(path):
    return None
  try:
    if os.path.isdir(path):
      probe = os.path.join(path, f'.cm_jax_write_test.{os.getpid()}')
      with open(probe, 'wb') as f:
        f.write(b'x')
      os.remove(probe)
      return None
  except OSError as e:
    return e.strerror or str(e)
  if os.path.exists(path):
    return 'not a directory'
  missing = [os.path.abspath(path)]
  while not os.path.exists(os.path.dirname(missing[-1])):
    missing.append(os.path.dirname(missing[-1]))
  parent = os.path.dirname(missing[-1])
  if not os.path.isdir(parent):
    return f'{parent} is not a directory'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'cannot create it in {parent}'
  try:  # Some file systems refuse what access() allows (/proc, /sys, read-only mounts): try, then undo.
    os.makedirs(missing[0])
  except OSError as e:
    return f'cannot create {e.filename or missing[0]}: {e.strerror or e}'
  finally:
    for folder in missing:  # Deepest first; nothing of this check is left behind.
      try:
        os.rmdir(folder)
      except OSError:
        break
  return None


def available_memory_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (Linux), else physical memory, else None."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def check_fits_in_memory(num_bytes: int, what: str, fix: str, fraction: float = 0.5) -> None:
  """Refuses work whose results (num_bytes, held in host memory) exceed `fraction` of the available memory."""
  available = available_memory_bytes()
  if available is not None and num_bytes > fraction * available:
    raise errors.ResourceLimitError(f'{what} needs about {format_bytes(num_bytes)} of host memory for its '
                                    f'results, more than {fraction:.0%} of the {format_bytes(available)} '
                                    f'available: {fix}')


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'
