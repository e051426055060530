"""The EDM teacher of consistency distillation ('cd') and easy consistency tuning ('ect').

The teacher is a cm_jax run trained with loss.name = 'edm'. Its sampling-EMA parameters are restored read-only
through Orbax (inference.load) before anything is traced; the losses receive them as an argument.
"""

from __future__ import annotations

import ml_collections

from cm_jax import checkpointing
from cm_jax import inference

# Fields where the student must agree with its teacher whatever the initialisation.
_SHARED_FIELDS = ('data.name', 'data.pad_to', 'consistency.sigma_data')


def load_teacher(config: ml_collections.ConfigDict) -> inference.LoadedModel:
  """Restores config.teacher.workdir (step teacher.step, EMA teacher.ema) and checks it fits `config`.

  Raises FileNotFoundError (no checkpoint there) or ValueError (not an EDM run, or a mismatch), each naming
  the path and the fields.
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
  old = checkpointing.flatten_dict(teacher_config.to_dict())
  new = checkpointing.flatten_dict(config.to_dict())
  for field in _SHARED_FIELDS:
    if old.get(field) != new.get(field):
      problems.append(f'{field}: teacher {old.get(field)!r}, student {new.get(field)!r}')
  if config.teacher.init_student:
    model_diff = sorted(k for k in old.keys() | new.keys()  # Dropout does not change the parameters.
                        if k.startswith('model.') and k != 'model.dropout' and old.get(k) != new.get(k))
    problems.extend(f'{k}: teacher {old.get(k)!r}, student {new.get(k)!r} (teacher.init_student = True copies '
                    "the teacher's weights, so config.model must equal the teacher's; or set "
                    'teacher.init_student = False for a randomly initialised student)' for k in model_diff)
  if problems:
    raise ValueError(f'The teacher in {checkpointing.checkpoint_dir(workdir)} does not fit this run: '
                     + '; '.join(problems) + '.')
