r"""Training: `python -m cm_jax.train --config=configs/mnist_ct.py --workdir=DIR`.

One loop for every objective in cm_jax/core/losses.py: consistency training ('ct'), the EDM teacher ('edm'),
consistency distillation from that teacher ('cd') and easy consistency tuning ('ect').
`train_and_evaluate(config, workdir)` is the one entry point (CLI, tests, notebooks). A workdir is a run:
starting again in a workdir that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from typing import Callable, Optional

from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from cm_jax import checkpointing
from cm_jax import config_validation
from cm_jax import input_pipeline
from cm_jax import samplers
from cm_jax import teacher as teacher_lib
from cm_jax import train_state as ts
from cm_jax.configs import common as config_lib
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import losses
from cm_jax.core import sampling
from cm_jax.evaluation import evaluator as evaluator_lib
from cm_jax.runtime import cli
from cm_jax.runtime import errors
from cm_jax.runtime import images
from cm_jax.runtime import multihost
from cm_jax.runtime import sharding
from cm_jax.runtime import workdir_lock
from cm_jax.train_step import param_max_abs
from cm_jax.train_step import train_step
from cm_jax.train_step import UpdateSettings


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState:
  """Trains (or resumes) the run in `workdir` up to config.training.num_steps; returns the final state.

  On SIGTERM or SIGINT it stops after a step that every process reaches, saves a checkpoint there and returns
  that step's state (in the main thread; elsewhere signals keep their usual effect).
  """
  config_validation.validate(config)
  for note in config_validation.advisories(config):
    logging.warning('%s', note)
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', previous or config.training.disable_most_optimizations)
  try:
    # SIGTERM (preemption notice) or SIGINT: every process stops at one agreed step and saves it. One run per
    # workdir: a second one is refused with the name of the first (WORKDIR/LOCK.json).
    with multihost.StopSignal() as stop_signal, workdir_lock.WorkdirLock(workdir):
      return _train(config, workdir, stop_signal)
  finally:  # A process-wide setting: leave it as it was for later runs in the same notebook or test.
    jax.config.update('jax_disable_most_optimizations', previous)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_signal: multihost.StopSignal) -> ts.TrainState:
  # clu's writers import TensorFlow (seconds): only once a run really starts.
  with cli.native_stderr_hidden():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  tc, ev = config.training, config.evaluation

  # ----------------------------------------------------------------------------------------------
  # Mesh: one ('data',) axis over every device of every process.
  # ----------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh()
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  config_validation.validate_batch(tc.batch_size, jax.device_count(), jax.process_count())

  # ----------------------------------------------------------------------------------------------
  # Input: the batch of step k is a function of (seed, k); each process reads its rows (in memory or streamed
  # from disk, data.storage) while the previous step computes. Labels only for class-conditional models.
  # ----------------------------------------------------------------------------------------------
  config = resolve_num_classes(config)
  train_data = load_train_data(config)
  image_shape = tuple(train_data.image_shape)
  with contextlib.ExitStack() as stack:
    if hasattr(train_data, 'close'):  # Decoding threads or processes of a streamed folder.
      stack.callback(train_data.close)
    stream = stack.enter_context(contextlib.closing(input_pipeline.BatchStream(
        train_data, config.seed, tc.batch_size, jax.process_index(), jax.process_count())))

    def global_batch(step: int):
      images_local, labels_local = stream.get(step)
      return (jax.make_array_from_process_local_data(batch_sharding, images_local),
              None if labels_local is None else jax.make_array_from_process_local_data(batch_sharding, labels_local))

    # --------------------------------------------------------------------------------------------
    # Model, loss, optimizer and state (shapes first, then allocation directly into the sharding).
    # --------------------------------------------------------------------------------------------
    manager = stack.enter_context(checkpoint_manager(workdir, config))
    # N(k)/mu(k) and lr-decay horizons are fixed when a run starts (and recorded in its checkpoints): raising
    # training.num_steps later extends the run on the schedule it was trained with.
    config = ts.pin_schedule_horizons(config, checkpointing.saved_config(manager))
    # The EDM teacher of 'cd', 'scd', 'ect' (and a teacher-started 'sct'), pinned to the one the checkpoints record.
    teacher, teacher_record = teacher_lib.pin(config, (checkpointing.saved_data(manager) or {}).get('teacher'),
                                              resuming=manager.latest_step() is not None)
    data_fingerprint = (train_data.fingerprint if teacher_record is None else
                        dict(train_data.fingerprint, teacher=teacher_record))
    denoiser = denoiser_lib.make_denoiser(config)
    distilling = config.loss.name in ('cd', 'scd')
    objective = losses.make_loss(config, image_shape, denoiser_lib.make_denoiser(config, training=True),
                                 teacher=teacher.denoiser if distilling else None)
    tx = ts.make_optimizer(config)
    abstract_state = jax.eval_shape(functools.partial(ts.init_state, config, tx))
    # Replicated (data parallel), or FSDP: parameters, EMAs and optimizer state split over the devices.
    state_sharding = sharding.state_shardings(abstract_state, mesh, tc.sharding, tc.fsdp_min_size)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info('Model: %s parameters (%s); image shape %s; %s; %d devices, %d processes.', f'{num_params:,}',
                 tc.precision, image_shape, f'{config.model.num_classes} classes' if config.model.class_conditional
                 else 'unconditional', jax.device_count(), jax.process_count())
    logging.info('Train state (%s): %s.', tc.sharding, sharding.describe(abstract_state, state_sharding))

    # --------------------------------------------------------------------------------------------
    # Restore, or start from the teacher's weights, or fresh.
    # --------------------------------------------------------------------------------------------
    state = initial_state(config, workdir, manager, abstract_state, state_sharding, tx, data_fingerprint,
                          teacher)
    teacher_params = teacher.params if distilling else None
    del teacher  # ECT needs the teacher only for its first weights, CD only its parameters: free the rest.
    start_step = int(jax.device_get(state.step))
    # Only once the data, the teacher and any checkpoint have passed their checks: a refused start writes nothing.
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    stack.callback(writer.flush)

    # --------------------------------------------------------------------------------------------
    # Compiled functions, sample grids and in-training scores (evaluation.every > 0).
    # --------------------------------------------------------------------------------------------
    t0 = time.time()
    abstract_batch = (jax.ShapeDtypeStruct((tc.batch_size,) + image_shape, np.uint8, sharding=batch_sharding),
                      jax.ShapeDtypeStruct((tc.batch_size,), np.int32, sharding=batch_sharding)
                      if config.model.class_conditional else None)
    p_train_step = jax.jit(functools.partial(train_step, loss_fn=objective.loss_fn,
                                             target_decay=objective.target_decay, tx=tx,
                                             settings=UpdateSettings.of(config)),
                           in_shardings=(state_sharding, batch_sharding, replicated),
                           out_shardings=(state_sharding, None), donate_argnums=0,
                           ).lower(state, abstract_batch, teacher_params).compile()
    logging.info('Compiled the train step in %.1f s.', time.time() - t0)
    # Processes whose compile took longer (another host, a busy machine) catch up here, not in the first
    # collective, whose set-up may time out sooner.
    multihost.barrier('cm_jax_train_step_compiled')
    write_samples = sample_grid_writer(config, workdir, denoiser, image_shape, replicated, writer)
    write_scores = (score_writer(config, denoiser, image_shape, mesh, writer, stop_signal)
                    if ev.every and start_step < tc.num_steps else None)

    # --------------------------------------------------------------------------------------------
    # Loop. The next step is dispatched before the previous step's metrics are read.
    # --------------------------------------------------------------------------------------------
    if start_step >= tc.num_steps:
      logging.info('Step %d >= training.num_steps = %d: nothing to train.', start_step, tc.num_steps)
      return state
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                          for k, v in config_lib.flatten_dict(config.to_dict()).items()})
    report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
    pending, accumulated = [], []  # Device metrics not read yet; host metrics since the last log.

    def read_pending() -> None:  # Stops the run on a non-finite loss or gradient, or on non-finite or exploded weights.
      accumulated.extend(check_update(*p, manager.all_steps, tc.max_param_abs, checkpointing.checkpoint_dir(workdir))
                         for p in pending)
      pending.clear()

    def save(state: ts.TrainState) -> None:
      read_pending()  # Never save a state whose update failed check_update (non-finite or exploded).
      checkpointing.save(manager, state, config, data_fingerprint)

    t0, finished = time.time(), False
    for step in range(start_step, tc.num_steps):
      state, metrics = p_train_step(state, global_batch(step), teacher_params)
      read_pending()  # The previous step's, while this one runs.
      checkpointing.check_saves(manager)  # A background save that failed (full disk) stops the run here.
      pending.append((step, metrics))
      done = step + 1
      report(done)
      stop = stop_signal.reached()
      if stop or itstime(done, tc.log_every, tc.num_steps):
        read_pending()
        writer.write_scalars(done, {k: float(np.mean([m[k] for m in accumulated])) for k in accumulated[0]})
        accumulated.clear()
      saved = stop or itstime(done, tc.checkpoint_every, tc.num_steps)
      if saved:
        save(state)
      try:
        if not stop and itstime(done, tc.eval_every, tc.num_steps):
          write_samples(done, state)
        if not stop and write_scores and itstime(done, ev.every, tc.num_steps):
          write_scores(done, state)
      except multihost.Preempted:
        stop = True
        if not saved:
          save(state)
      if stop:
        checkpointing.wait(manager)
        logging.warning('Stopped by %s after step %d; saved its checkpoint in %s. Run the same command to '
                        'resume from it.', stop_signal.signal_name, done, checkpointing.checkpoint_dir(workdir))
        break
    else:
      finished = True
    logging.info('Trained steps %d..%d in %.1f s.', start_step, int(jax.device_get(state.step)), time.time() - t0)
  # Closed above: the final checkpoint is written. A signal that came after the last step's stop check (while
  # its samples or that checkpoint were written) found nothing left to stop: the last step ended the run.
  if finished and stop_signal.signal_name is not None:
    logging.warning('Stopped by %s after step %d, the last one: training is complete; its checkpoint is in %s.',
                    stop_signal.signal_name, tc.num_steps, checkpointing.checkpoint_dir(workdir))
  return state


def itstime(step: int, every: int, last: int) -> bool:
  """Whether step `step` (1-based: after that many updates) is one of a cadence: every `every`-th step and the
  last one; never when every is 0."""
  return bool(every) and (step % every == 0 or step == last)


@contextlib.contextmanager
def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict):
  """The run's Orbax checkpoint manager, closed on exit. On an error or interrupt, pending async saves finish
  first, so the last good checkpoint is kept (a save that fails meanwhile is logged; the error that stopped the
  run is the one reported); on a normal exit the last save is awaited, and its failure (a full disk) is the
  run's error."""
  manager = checkpointing.make_manager(workdir, config)
  try:
    yield manager
  except BaseException:
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('A checkpoint save failed while the run stopped: %s', checkpointing.describe_error(e))
    raise
  else:
    checkpointing.wait(manager)
  finally:
    manager.close()


def resolve_num_classes(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A class-conditional config with model.num_classes = 0 gets the training data's number of classes (a copy;
  the checkpoints record the number)."""
  if not (config.model.class_conditional and config.model.num_classes == 0):
    return config
  resolved = copy.deepcopy(config)
  resolved.model.num_classes = input_pipeline.num_classes(config.data)
  logging.info('model.num_classes = %d, from the %s training data.', resolved.model.num_classes, config.data.name)
  return resolved


def load_train_data(config: ml_collections.ConfigDict) -> input_pipeline.Dataset:
  """The train split (with labels for a class-conditional model), checked against the model and batch size."""
  class_conditional = config.model.class_conditional
  if class_conditional:  # Before reading any pixels (_train has resolved num_classes = 0 to the data's).
    config_validation.validate_num_classes(config.model.num_classes, input_pipeline.num_classes(config.data),
                                           config.data.name)
  train_data = multihost.process_zero_first(  # Process 0 downloads (if it must) before the others read.
      lambda: input_pipeline.load_dataset(config.data, 'train', with_labels=class_conditional), 'cm_jax_data')
  batch_size = config.training.batch_size
  if train_data.num_examples < batch_size:  # Every batch would repeat images: almost surely a mistake.
    raise errors.ConfigError(
        f'config.training.batch_size: {batch_size} is more than the {train_data.num_examples} training images '
        f'of data.name = {config.data.name!r}{" in " + config.data.manual_dir if config.data.manual_dir else ""}; '
        'lower the batch size or add images.')
  return train_data


def initial_state(config: ml_collections.ConfigDict, workdir: str, manager, abstract_state, state_sharding, tx,
                  data_fingerprint: dict, teacher) -> ts.TrainState:
  """The state training starts from: the workdir's checkpoint (resume), else the teacher's weights
  (teacher.init_student), else a fresh initialisation; allocated directly into `state_sharding`."""
  where = checkpointing.checkpoint_dir(workdir)
  if manager.latest_step() is not None:
    abstract_sharded = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    abstract_state, state_sharding)
    state = checkpointing.restore_for_resume(manager, abstract_sharded, config, data_fingerprint, workdir)
    check_restored(state, config.training.max_param_abs, where, manager.all_steps())
    logging.info('Resuming from the checkpoint at step %d in %s.', int(state.step), where)
    return state
  init = jax.jit(functools.partial(ts.init_state, config, tx), out_shardings=state_sharding)
  if teacher is not None and config.teacher.init_student:
    params = teacher.params
    if not ts.fits_student(params, abstract_state.params):
      raise ValueError(f'The teacher parameters in {config.teacher.workdir} do not fit config.model; give the '
                       'student the same model config as the teacher, or set teacher.init_student = False.')
    logging.info('No checkpoint in %s: starting from step 0 with the teacher\'s weights.', where)
    return init(params)
  logging.info('No checkpoint in %s: starting from step 0.', where)
  return init()


def sample_grid_writer(config: ml_collections.ConfigDict, workdir: str, denoiser, image_shape, replicated, writer):
  """write(step, state): fixed-seed sample grids (one panel per samplers.grid_samplers) to WORKDIR/samples/
  and TensorBoard."""
  num = config.training.num_eval_samples
  specs = samplers.grid_samplers(config)
  labels_B = samplers.grid_labels(samplers.num_classes(config.model), num)
  keys = sampling.example_keys(jax.random.PRNGKey(config.seed + 1), 0, num)
  p_sample_grid = jax.jit(lambda params: tuple(samplers.sample_from_keys(
      denoiser, params, keys, (num,) + tuple(image_shape), spec, labels_B=labels_B) for spec in specs),
                          out_shardings=replicated)

  def write(step: int, state: ts.TrainState) -> None:
    panels = [images.make_grid(input_pipeline.to_uint8(np.asarray(jax.device_get(x))))
              for x in p_sample_grid(sampling_params(state))]
    grid = images.side_by_side(panels)
    path = multihost.on_process_zero(  # Every process stops if the write fails (a full disk).
        lambda: images.save_png(grid, os.path.join(workdir, 'samples', f'step_{step:08d}.png')))
    if path is not None:
      logging.info('Wrote samples (%s) to %s', ' | '.join(s.describe() for s in specs), path)
    writer.write_images(step, {'samples': grid[None]})
  return write


def score_writer(config: ml_collections.ConfigDict, denoiser, image_shape, mesh, writer,
                 stop_signal: multihost.StopSignal):
  """write(step, state): in-training scores of the grid samplers (the same seed at every evaluation, so scores
  are comparable), as TensorBoard scalars 'eval/{1step|2step|heun18...}/{score}', through the evaluate CLI's
  library function. Building it may train the feature classifier and compute the reference features (both
  cached)."""
  ev = config.evaluation
  evaluator = evaluator_lib.make_evaluator_on_all_processes(config)
  p_sample = samplers.make_sample_fn(denoiser, mesh=mesh)
  specs = samplers.grid_samplers(config)
  labels = samplers.draw_labels(samplers.num_classes(config.model), ev.num_samples, ev.seed)

  def write(step: int, state: ts.TrainState) -> None:
    params = sampling_params(state)
    sample = lambda spec, num: input_pipeline.to_uint8(samplers.sample_in_batches(
        p_sample, params, spec, num, ev.seed, ev.batch_size, image_shape, labels, before_batch=stop_signal.check))
    results = evaluator_lib.score_samplers(sample, evaluator, specs, ev.num_samples)
    writer.write_scalars(step, {f'eval/{evaluator_lib.sampler_key(spec)}/{key}': value
                                for spec, result in zip(specs, results)
                                for key, value in evaluator_lib.scalar_scores(result).items()})
  return write


def sampling_params(state: ts.TrainState):
  """What grids and in-training evaluations sample with: the first sampling EMA (else the online params)."""
  return state.ema_params[0] if state.ema_params else state.params


def check_update(step: int, metrics, checkpoints: Callable[[], list[int]], max_param_abs: Optional[float],
                 where: str) -> dict:
  """Host copy of the metrics of the update from step `step` to `step + 1` (checkpoint numbering: the state
  after k updates is step k). Stops the run at once if that update's loss or gradient norm is not finite, or if
  it left a weight (parameters, target or EMAs: metrics['param_max_abs']) non-finite or above max_param_abs
  (training.max_param_abs; 0 or None: no bound).

  The loop reads the metrics of an update before it saves the state that update produced, so a state that fails
  here is never saved and every checkpoint listed (`checkpoints()`: steps, async saves included) is one to
  resume from. Exploded weights must stop the run even while the loss still reads finite (after one Adam step
  at lr = 1e6 they are ~1e6): saved, they would give a NaN loss on resume whatever the new learning rate.
  `where` is the checkpoint directory, for the advice.
  """
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  update = f'the update from step {step} to step {step + 1}'
  w = host.get('param_max_abs', 0.0)
  bad_loss = not (np.isfinite(host['loss']) and np.isfinite(host['grad_norm']))
  if bad_loss:
    what = f'Non-finite loss {host["loss"]} or gradient norm {host["grad_norm"]} in {update}'
  elif not np.isfinite(w):
    what = f'Non-finite parameters (max |w| = {w}) after {update}'
  elif max_param_abs and w > max_param_abs:
    what = f'Parameters exploded: max |w| = {w:.3g} > training.max_param_abs = {max_param_abs:g} after {update}'
  else:
    return host
  steps = sorted(checkpoints())
  if bad_loss and steps and steps[-1] == step:
    # The loss and gradient of this update are functions of the saved state alone (the learning rate acts only
    # afterwards): resuming from it would fail the same way at once.
    older = (f'resumes from step {steps[-2]}, the checkpoint before it' if len(steps) > 1 else
             'starts again from step 0')
    resume = (f'The last checkpoint, step {step}, holds the weights this update started from, so resuming from it '
              f'repeats this whatever the learning rate: move {where}/{step} out of the way, and restarting '
              f'{older}')
  elif steps:
    resume = f'Restarting resumes from the last good checkpoint, step {steps[-1]}'
  else:
    resume = 'No checkpoint was saved yet, so restarting starts again from step 0'
  raise FloatingPointError(
      f'{what} (metrics: {host}). The run stops here, before saving that state. {resume}: try a lower '
      '--config.optim.lr or gradient clipping (--config.optim.grad_clip=1.0), or start a new workdir with '
      'optim.warmup_steps > 0.')


def check_restored(state: ts.TrainState, max_param_abs: Optional[float], where: str,
                   steps: list[int]) -> None:
  """Refuses to resume from a state with non-finite weights, or weights above training.max_param_abs.

  check_update keeps such states from being saved, but a checkpoint written by an older cm_jax (or under a
  higher or no bound) may hold one, and training on from it gives a non-finite loss at once whatever the
  learning rate. `steps` are the checkpoints in `where`, for the advice.
  """
  w = float(jax.device_get(jax.jit(param_max_abs)(state.params, state.target_params, state.ema_params)))
  if np.isfinite(w) and not (max_param_abs and w > max_param_abs):
    return
  step = int(jax.device_get(state.step))
  what = (f'non-finite weights (max |w| = {w})' if not np.isfinite(w) else
          f'exploded weights (max |w| = {w:.3g} > training.max_param_abs = {max_param_abs:g})')
  older = [s for s in steps if s < step]
  then = (f'the run resumes from step {older[-1]}, the checkpoint before it (checked the same way)' if older else
          'the run starts again from step 0 (no older checkpoint there)')
  raise errors.InputFileError(
      f'The checkpoint of step {step} in {where} holds {what} in its parameters, target or EMAs: training on from '
      f'it diverges at once whatever the learning rate. Move {where}/{step} out of the way and {then}; or start a '
      'new --workdir; or, if these weights are intended, raise --config.training.max_param_abs (0 turns the bound '
      'off).')


FLAGS = flags.FLAGS


def define_flags() -> None:
  """CLI flags; defined only when this module runs as the main program, so importing it defines none."""
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard logs, sample grids.')
  multihost.define_flags()


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise errors.UsageError('Both --config=CONFIG.py and --workdir=DIR are required.')
  config_validation.validate(FLAGS.config)  # Before anything is created, so a bad value leaves no trace.
  multihost.initialize_from_flags()
  multihost.on_process_zero(lambda: check_workdir(FLAGS.workdir))  # Every process stops if it fails.
  multihost.set_resume_advice(lambda: resume_advice(FLAGS.workdir))  # For the line of a lost process.
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


def resume_advice(workdir: str) -> str:
  """'the run resumes from step K, ...': the newest complete checkpoint in `workdir` (a plain listing: no
  collective, no Orbax, which may wait on a lost process)."""
  folder = epath.Path(checkpointing.checkpoint_dir(workdir))
  steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  if not steps:
    return 'no checkpoint is complete yet, so the run starts again from step 0.'
  return f'the run resumes from step {steps[-1]}, the newest checkpoint in {folder}.'


def check_workdir(workdir: str) -> None:
  """Before anything is written: files can be written in `workdir`, and its folders are not files."""
  cli.check_writable_dir(workdir, '--workdir')
  for name, holds in ((checkpointing.CHECKPOINT_SUBDIR, 'checkpoints'),
                      ('unreadable_checkpoints', 'damaged checkpoints moved aside')):
    folder = os.path.join(workdir, name)
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise errors.OutputPathError(f'--workdir={workdir}: {folder} is a file, where cm_jax keeps {holds}; move '
                                   'or rename it, or choose another --workdir.')


if __name__ == '__main__':
  cli.run(main, define_flags)
