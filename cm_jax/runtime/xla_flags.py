"""XLA options cm_jax sets by default: CPU compilation settings measured to train and sample faster.

XLA reads the XLA_FLAGS environment variable once, when the first JAX backend starts. `apply()` appends
cm_jax's defaults to it, so it must run before the first computation (importing jax is fine); every cm_jax
entry point (`cm_jax.train`, `sample`, `evaluate`, `edit`, the benchmarks) and `import cm_jax.inference` call
it. After the backend has started it does nothing and says so in its return value.

The defaults (measured on a 2-core Xeon with AVX-512, jaxlib 0.10.2; benchmarks/README.md has the figures):
- `--xla_cpu_experimental_ynn_fusion_type=dot,reduce`: XLA:CPU's default hands convolutions to YNNPACK, whose
  kernel-gradient convolutions run at 25-60 GFLOP/s on this machine; with the fusion list set explicitly, the
  convolutions go to XLA's Eigen kernels (100-290 GFLOP/s for the same kernel gradients, and faster forward
  and input-gradient convolutions at 32+ channels), while matmuls and reductions stay with YNNPACK.

Rules: a flag already in XLA_FLAGS is the user's choice and is kept; CM_JAX_XLA_DEFAULTS=0 turns every
default off; a jaxlib release other than the ones below does not get them (an unknown XLA flag aborts the
process), and `apply()` reports that. The options only affect the CPU backend.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

# (flag, value) pairs, in the order they are appended.
CPU_DEFAULTS: tuple[tuple[str, str], ...] = (
    ('xla_cpu_experimental_ynn_fusion_type', 'dot,reduce'),
)
# jaxlib releases (major.minor prefixes) known to accept every flag of CPU_DEFAULTS.
TESTED_JAXLIB = ('0.10.',)
OPT_OUT = 'CM_JAX_XLA_DEFAULTS'


def flag_names(xla_flags: str) -> set[str]:
  """The names of the flags set in an XLA_FLAGS string ('--a=1 --b' -> {'a', 'b'})."""
  names = set()
  for token in xla_flags.split():
    if token.startswith('--'):
      names.add(token[2:].split('=', 1)[0])
  return names


def merged(xla_flags: str, defaults: tuple[tuple[str, str], ...] = CPU_DEFAULTS) -> str:
  """xla_flags with each default appended unless the flag is already set there."""
  present = flag_names(xla_flags)
  extra = [f'--{name}={value}' for name, value in defaults if name not in present]
  return ' '.join([xla_flags.strip()] + extra).strip()


def decide(environ: Mapping[str, str], jaxlib_version: str, backend_started: bool) -> tuple[Optional[str], str]:
  """(the new XLA_FLAGS value or None to leave it, a one-line reason): the pure part of apply()."""
  if environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return None, f'cm_jax XLA defaults off ({OPT_OUT}={environ[OPT_OUT]})'
  if not jaxlib_version.startswith(TESTED_JAXLIB):
    return None, (f'cm_jax XLA defaults not applied: jaxlib {jaxlib_version} is not one of the tested releases '
                  f'{", ".join(v + "x" for v in TESTED_JAXLIB)}')
  current = environ.get('XLA_FLAGS', '')
  new = merged(current)
  if new == current.strip():
    return None, 'cm_jax XLA defaults: every flag already set in XLA_FLAGS'
  if backend_started:
    return None, 'cm_jax XLA defaults not applied: a JAX backend had already started (XLA_FLAGS is read once)'
  return new, f'XLA_FLAGS={new}'


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def apply(environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Appends the defaults to XLA_FLAGS (see the module docstring); returns what it did, in one line."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  version = getattr(jaxlib, '__version__', None) or getattr(getattr(jaxlib, 'version', None), '__version__', '')
  new, reason = decide(environ, str(version), _backend_started())
  if new is not None:
    environ['XLA_FLAGS'] = new
  return reason
