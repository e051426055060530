"""What a benchmark record says about the machine it ran on (imports only the standard library)."""

import os


def cpu_model() -> str:
  """The `model name` line of /proc/cpuinfo (what `lscpu` calls Model name), or 'unknown'."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown'


def load_average() -> float:
  """The 1-minute load average: how busy the (often shared) machine was."""
  return round(os.getloadavg()[0], 2)
