"""The EDM teacher of consistency distillation ('cd', 'scd') and easy consistency tuning ('ect').

The teacher is a cm_jax run trained with loss.name = 'edm'. Its sampling-EMA parameters are restored read-only
through Orbax (inference.load) before anything is traced; the losses receive them as an argument.
"""

from __future__ import annotations

import hashlib
from typing import Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from cm_jax import checkpointing
from cm_jax import inference
from cm_jax.configs import common as config_lib
from cm_jax.runtime import paths

# Losses that use the teacher only for the student's first weights (an 'sct' run may also have none).
INIT_ONLY_LOSSES = ('ect', 'sct')

# Fields where the student must agree with its teacher whatever the initialisation.
_SHARED_FIELDS = ('data.name', 'data.pad_to', 'data.image_size', 'data.tfds_config', 'data.class_map',
                  'consistency.sigma_data', 'model.class_conditional', 'model.num_classes')


def pin(config: ml_collections.ConfigDict, saved_record: Optional[dict],
        resuming: bool = False) -> tuple[Optional[inference.LoadedModel], Optional[dict]]:
  """The teacher of a 'cd', 'scd', 'ect' run (or an 'sct' run with teacher.workdir) and its fingerprint; (None,
  None) for other runs.

  saved_record is the fingerprint in the run's newest checkpoint (None at a fresh start, or for an sCT run
  started from random weights); resuming says whether the run has a checkpoint. A CD or sCD run loads
  its teacher and refuses one that differs from the record; an ECT or sCT run, which uses the teacher only for
  its first weights, resumes without loading it (teacher None) and keeps the record.
  """
  if config.loss.name not in ('cd', 'ect', 'scd', 'sct'):
    return None, None
  if config.loss.name == 'sct' and config.teacher.workdir is None:  # sCT from random weights.
    return None, None
  if config.loss.name in INIT_ONLY_LOSSES and (saved_record is not None or resuming):
    return None, saved_record  # Its weights come from the checkpoint; keep what (if anything) started it.
  teacher = load_teacher(config)
  record = fingerprint(teacher, config.teacher.workdir)
  if saved_record is not None:
    check_same_teacher(saved_record, record)
  logging.info('Teacher: step %d of %s (%s, sha256 %s); %s.', teacher.step, record['workdir'],
               teacher.which_params, record['sha256'][:12],
               'a fresh student starts from its weights' if config.teacher.init_student else
               'a fresh student starts from random weights')
  return teacher, record


def load_teacher(config: ml_collections.ConfigDict) -> inference.LoadedModel:
  """Restores config.teacher.workdir (step teacher.step, EMA teacher.ema) and checks it fits `config`.

  Raises FileNotFoundError (no checkpoint there), checkpointing.UnreadableCheckpointError (teacher.step is
  damaged: unreadable, or its parameters fail their checksums; with teacher.step None the newest intact step
  is used, with a warning) or ValueError (not an EDM run, or a mismatch), each naming the path and the fields.
  """
  tc = config.teacher
  if tc.workdir is None:
    raise ValueError(f'config.teacher.workdir is not set, but loss.name = {config.loss.name!r} needs an EDM '
                     'teacher: train one with `python -m cm_jax.train --config=configs/fashion_mnist_edm.py '
                     '--workdir=TEACHER_DIR` and pass --config.teacher.workdir=TEACHER_DIR.')
  try:
    teacher = inference.load(tc.workdir, step=tc.step, ema=tc.ema)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.teacher.workdir = {tc.workdir!r}: {e}') from e
  except checkpointing.UnreadableCheckpointError as e:  # Keeps its type: a damaged file, not a bad value.
    raise checkpointing.UnreadableCheckpointError(
        f'config.teacher (workdir {tc.workdir!r}, step {tc.step}): {e}') from e
  except ValueError as e:
    raise ValueError(f'config.teacher (workdir {tc.workdir!r}, step {tc.step}, ema {tc.ema}): {e}') from e
  check_teacher(teacher.config, config, tc.workdir)
  return teacher


def check_teacher(teacher_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                  workdir: str) -> None:
  """Raises ValueError listing every way the teacher in `workdir` does not fit the student's `config`."""
  problems = []
  if teacher_config.loss.name != 'edm':
    problems.append(f"it was trained with loss.name = {teacher_config.loss.name!r}, not 'edm' (a teacher is an "
                    'EDM diffusion model)')
  old = config_lib.flatten_dict(teacher_config.to_dict())
  new = config_lib.flatten_dict(config.to_dict())
  for field in _SHARED_FIELDS:
    if old.get(field) != new.get(field):
      problems.append(f'{field}: teacher {old.get(field)!r}, student {new.get(field)!r}')
  if config.teacher.init_student:
    # Dropout does not change the parameters; the student's adaptive-weight head starts fresh.
    model_diff = sorted(k for k in old.keys() | new.keys()
                        if k.startswith('model.') and k not in ('model.dropout', 'model.adaptive_weight')
                        and old.get(k) != new.get(k))
    problems.extend(f'{k}: teacher {old.get(k)!r}, student {new.get(k)!r} (teacher.init_student = True copies '
                    "the teacher's weights, so config.model must equal the teacher's; or set "
                    'teacher.init_student = False for a randomly initialised student)' for k in model_diff)
  if problems:
    raise ValueError(f'The teacher in {checkpointing.checkpoint_dir(workdir)} does not fit this run: '
                     + '; '.join(problems) + '.')


def fingerprint(teacher: inference.LoadedModel, workdir: str) -> dict:
  """What identifies a teacher: its absolute workdir, checkpoint step, which parameters, and their sha256.

  Saved with every checkpoint of a CD, sCD, ECT or (teacher-started) sCT run, so that a resumed run is distilled
  from the same network.
  """
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(teacher.params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return {'workdir': paths.absolute(workdir), 'step': int(teacher.step), 'params': teacher.which_params,
          'sha256': digest.hexdigest()}


def check_same_teacher(saved: dict, now: dict) -> None:
  """Refuses to resume a run with another teacher than the one it was started with."""
  if saved != now:
    raise ValueError(
        f'This run was started with the teacher at step {saved["step"]} of {saved["workdir"]} ({saved["params"]}, '
        f'sha256 {saved["sha256"][:12]}), but config.teacher now gives step {now["step"]} of {now["workdir"]} '
        f'({now["params"]}, sha256 {now["sha256"][:12]}); a resumed run would be distilled from another network. '
        f'Resume with --config.teacher.workdir={saved["workdir"]} --config.teacher.step={saved["step"]} (and the '
        'same teacher.ema), or start a new --workdir.')
