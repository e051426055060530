"""One process of tests/test_multihost.py's agreement checks: `python multihost_agreement_worker.py CASE ROOT
COORDINATOR PROCESS_ID` (2 processes, gloo on 127.0.0.1). Prints one JSON line: what this process got."""

import json
import os
import sys
import types

import numpy as np

from cm_jax import checkpointing
from cm_jax.configs import test as test_config
from cm_jax.runtime import errors
from cm_jax.runtime import multihost


class Manager:
  """The part of a CheckpointManager the restores use, over folders ROOT/checkpoints/1..3 (each step's state is
  {'w': [step, step]}); `fail` maps a step to the error its reads raise on this process."""

  def __init__(self, directory, config, fail):
    self.directory, self.config, self.fail = directory, config, fail

  def all_steps(self):
    return sorted(int(n) for n in os.listdir(self.directory))

  def restore(self, step, args=None):
    del args
    if step in self.fail:
      raise self.fail[step]
    return types.SimpleNamespace(state={'w': np.full(2, step, np.float32)}, config=self.config.to_dict(),
                                 data={'n': 1})

  def reload(self):
    pass


def outcome(fn):
  try:
    return {'result': fn()}
  except Exception as e:  # pylint: disable=broad-except
    return {'error': type(e).__name__, 'message': str(e), 'kind': getattr(e, 'kind', None),
            'exit_code': getattr(e, 'exit_code', None)}


def main(case, root, coordinator, process_id):
  multihost.initialize(coordinator, 2, process_id)
  me = process_id
  out = {}
  if case == 'agreed':
    def fail_on(process, error):
      def fn():
        if me == process:
          raise error
        return me
      return fn
    damage = lambda e: 2 if isinstance(e, TypeError) else 1
    out['ok'] = outcome(lambda: multihost.agreed(lambda: me))
    out['one_fails'] = outcome(lambda: multihost.agreed(fail_on(1, errors.InputFileError('bad file on process 1'))))
    out['worst_kind_wins'] = outcome(lambda: multihost.agreed(
        fail_on(me, ValueError('damaged here') if me == 0 else TypeError('a bug there')), kind_of=damage))
    out['zero_fails'] = outcome(lambda: multihost.on_process_zero(
        fail_on(0, errors.OutputPathError('--out=/x: not writable'))))
    out['zero_result'] = outcome(lambda: multihost.on_process_zero(lambda: 'written'))
  else:  # 'resume' / 'read_only': step 3 fails to read on process 1 only.
    config = test_config.get_config()
    checkpoints = os.path.join(root, 'checkpoints')
    if me == 0:
      for step in (1, 2, 3):
        os.makedirs(os.path.join(checkpoints, str(step)))
    multihost.barrier('folders')
    fail = {3: ValueError('OUT_OF_RANGE: Error reading "params" (injected on process 1)')} if me == 1 else {}
    manager = Manager(checkpoints, config, fail)
    if case == 'resume':
      state = outcome(lambda: checkpointing.restore_for_resume(manager, None, config, {'n': 1}, root)['w'].tolist())
      out['state'] = state
      multihost.barrier('moved')
      out['steps'] = manager.all_steps()
      aside = os.path.join(root, 'unreadable_checkpoints')
      out['aside'] = sorted(n.split('-')[0] for n in os.listdir(aside)) if os.path.isdir(aside) else []
    else:
      # inference.load's path: restore_config (an agreed read) of each step, newest first.
      out['read_only'] = outcome(lambda: list(checkpointing.restore_read_only(
          manager, lambda s: checkpointing.restore_config(manager, s).seed)))
  print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
