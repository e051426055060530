"""Checks a config before any work starts; every error names the field and the fix."""

from __future__ import annotations

import math

import ml_collections

from cm_jax import input_pipeline
from cm_jax.configs import common as config_lib
from cm_jax.data import catalog
from cm_jax.input_pipeline import MNIST_FAMILY
from cm_jax.runtime import errors

CHOICES = {
    'data.source': ('auto', 'tfds', 'local'),
    'data.storage': ('memory', 'stream', 'prepared'),
    'training.precision': ('float32', 'bfloat16'),
    'training.sharding': ('replicated', 'fsdp'),
    'training.ema_warmup': ('capped', 'debias', 'none'),
    'model.name': ('unet',),
    'model.embedding': ('fourier', 'positional'),
    'loss.name': ('ct', 'edm', 'cd', 'ect', 'sct', 'scd', 'meanflow'),
    'loss.mf_time_order': ('sort', 'min'),
    'loss.schedule': ('exponential', 'adaptive', 'fixed'),
    'loss.index_distribution': ('lognormal', 'uniform'),
    'loss.distance': ('pseudo_huber', 'l2', 'l1', 'l2_norm'),
    'loss.weighting': ('inverse_delta', 'uniform', 'edm'),
    'loss.target': ('stopgrad', 'ema'),
    'loss.mu_variant': ('paper', 'official', 'constant'),
    'teacher.solver': ('heun', 'euler'),
    'sampling.diffusion_solver': ('heun', 'euler'),
    'optim.name': ('adam', 'radam'),
    'optim.decay': ('constant', 'cosine'),
    'evaluation.feature_net': ('auto', 'classifier', 'inception'),
    'evaluation.reference_split': ('auto', 'train', 'test'),
}


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise errors.ConfigError(f'config.{field}: {message}')


# Losses that read an EDM teacher (config.teacher.workdir).
TEACHER_LOSSES = ('cd', 'ect', 'scd')

# Sequence fields and the type of their elements (overrides such as --config.model.ch_mult=(1,x) pass
# ml_collections' own type checks, which look at the tuple only).
SEQUENCES = {'model.ch_mult': int, 'model.attn_resolutions': int, 'training.ema_rates': float}


# Fastest angular frequency of the time embedding per unit of c_noise = ln(sigma) / 4 above which sCT / sCD get a
# warning: sCM (Lu & Song 2024, Sec. 4.1, Fig. 4) found continuous-time training unstable with Fourier scale 16
# and uses low-frequency (positional, ~0.02 Fourier) embeddings; the jvp differentiates the embedding in c_noise.
SCM_MAX_EMBEDDING_FREQUENCY = 2 * math.pi


def embedding_frequency(model: ml_collections.ConfigDict) -> float:
  """Nominal fastest angular frequency of the time embedding in c_noise: 2 pi fourier_scale (one standard
  deviation of the random frequencies) or positional_scale (the positional embedding's top frequency is 1)."""
  if model.embedding == 'fourier':
    return 2 * math.pi * model.fourier_scale
  return float(model.positional_scale)


def advisories(config: ml_collections.ConfigDict) -> list[str]:
  """Settings that are valid but known to work badly: one line each, with the field and the fix (logged as
  warnings by the trainer; nothing is changed)."""
  notes = []
  if config.loss.name in ('sct', 'scd'):
    frequency = embedding_frequency(config.model)
    if frequency > SCM_MAX_EMBEDDING_FREQUENCY:
      field = 'fourier_scale' if config.model.embedding == 'fourier' else 'positional_scale'
      notes.append(
          f'config.model.{field} = {config.model[field]} gives the time embedding frequencies up to ~{frequency:.3g} '
          f"per unit of ln(sigma) / 4; loss.name = {config.loss.name!r} differentiates the network in time, and "
          'sCM found such high-frequency embeddings unstable: use model.embedding = fourier with fourier_scale '
          '0.02 (the default), or a positional_scale of at most ~6.')
  return notes


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (errors.ConfigError) naming the first bad field."""
  for field, kind in SEQUENCES.items():
    value = _get(config, field)
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool) for v in value)
    _require(ok, field, f'{value!r} is not a tuple of {kind.__name__}s, e.g. '
             f'--config.{field}="{"(1, 2, 2)" if kind is int else "(0.999,)"}".')
  for field, options in CHOICES.items():
    value = _get(config, field)
    _require(value in options, field, f'{value!r} is not one of {list(options)}.')
  _require(config.data.name in input_pipeline.SUPPORTED, 'data.name',
           f'{config.data.name!r} is not one of {sorted(input_pipeline.SUPPORTED)}.')

  tc, mc, lc, cc = config.training, config.model, config.loss, config.consistency
  for field in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'eval_every', 'num_eval_samples',
                'keep_checkpoints'):
    _require(tc[field] >= 1, f'training.{field}', f'must be >= 1, got {tc[field]}.')
  _require(tc.keep_every >= 0, 'training.keep_every', 'must be >= 0 (0 keeps no extra checkpoints).')
  _require(tc.max_param_abs is None or (isinstance(tc.max_param_abs, (int, float)) and tc.max_param_abs >= 0),
           'training.max_param_abs', f'must be a number > 0 (the largest |weight| a healthy run reaches; default '
           f'1e4) or 0 to turn the divergence guard off, got {tc.max_param_abs!r}.')
  _require(tc.fsdp_min_size >= 1, 'training.fsdp_min_size', f'must be >= 1, got {tc.fsdp_min_size}.')
  _require(all(0.0 <= r < 1.0 for r in tc.ema_rates), 'training.ema_rates',
           f'rates must lie in [0, 1), got {tc.ema_rates}.')
  _require(len(tc.ema_rates) >= 1, 'training.ema_rates', 'give at least one sampling EMA rate.')

  _require(0 < cc.sigma_min < cc.sigma_max, 'consistency.sigma_min',
           f'need 0 < sigma_min < sigma_max, got {cc.sigma_min}, {cc.sigma_max}.')
  _require(cc.sigma_data > 0 and cc.rho > 0, 'consistency.sigma_data', 'sigma_data and rho must be > 0.')
  start_t = config.sampling.start_t
  _require(start_t is None or cc.sigma_min < start_t <= cc.sigma_max, 'sampling.start_t',
           f'{start_t} must be None (start at sigma_max) or lie in (sigma_min, sigma_max] = '
           f'({cc.sigma_min}, {cc.sigma_max}].')
  _require(start_t is None or config.loss.name != 'edm', 'sampling.start_t',
           "is for consistency sampling; an EDM model (loss.name = 'edm') samples from sigma_max: leave it None.")
  first = cc.sigma_max if start_t is None else start_t
  if config.loss.name == 'meanflow':  # Flow times: noise at 1, data at 0.
    _require(start_t is None, 'sampling.start_t',
             "is for consistency sampling; a MeanFlow model samples from t = 1: leave it None.")
    _require(0.0 < config.sampling.two_step_t < 1.0, 'sampling.two_step_t',
             f"{config.sampling.two_step_t}: a MeanFlow model's two-step time is a flow time in (0, 1) (noise at 1, "
             'data at 0), e.g. 0.5.')
  else:
    _require(cc.sigma_min < config.sampling.two_step_t < first, 'sampling.two_step_t',
             f'{config.sampling.two_step_t} must lie strictly between sigma_min and the first sampling time '
             f'({"sampling.start_t" if start_t is not None else "sigma_max"} = {first}).')

  _require(1 <= lc.s0 <= lc.s1, 'loss.s0', f'need 1 <= s0 <= s1, got s0={lc.s0}, s1={lc.s1}.')
  if lc.schedule == 'adaptive':
    _require(lc.s0 >= 2, 'loss.s0', 'the adaptive schedule needs s0 >= 2 (N(0) = s0 grid points).')
  _require(lc.total_steps is None or lc.total_steps >= 1, 'loss.total_steps', 'must be None or >= 1.')
  _require(0.0 < lc.mu0 < 1.0, 'loss.mu0', f'must lie in (0, 1), got {lc.mu0}.')
  _require(lc.p_std > 0, 'loss.p_std', 'must be > 0.')
  if lc.schedule == 'fixed':
    _require(lc.num_points >= 2, 'loss.num_points',
             f'the fixed schedule needs >= 2 grid points, got {lc.num_points}.')
  _require(lc.edm_p_std > 0, 'loss.edm_p_std', 'must be > 0.')
  _require(lc.ect_q > 1, 'loss.ect_q', f'must be > 1 (the gap shrinks by q per stage), got {lc.ect_q}.')
  _require(lc.ect_k >= 0, 'loss.ect_k', f'must be >= 0, got {lc.ect_k}.')
  _require(lc.ect_b >= 0, 'loss.ect_b', f'must be >= 0, got {lc.ect_b}.')
  _require(lc.ect_stage_steps >= 1, 'loss.ect_stage_steps', f'must be >= 1, got {lc.ect_stage_steps}.')
  if lc.name == 'ect':
    # r = t (1 - q^-(stage+1) (...)) in float32: past a relative gap of ~2^-14 the gap t - r is quantised
    # and at ~2^-24 it is 0 (an infinite weight 1/(t - r)).
    last_stage = (tc.num_steps - 1) // lc.ect_stage_steps
    _require(lc.ect_q ** (last_stage + 1) <= 2.0**14, 'loss.ect_stage_steps',
             f'{tc.num_steps} steps at {lc.ect_stage_steps} steps per stage reach stage {last_stage}, where the '
             f'gap t - r = t q^-(stage+1)(...) is below float32 resolution (q = {lc.ect_q}); raise '
             'ect_stage_steps so that q^(last stage + 1) <= 2^14.')
  if lc.schedule == 'fixed' and lc.target == 'ema' and lc.name in ('ct', 'cd'):
    _require(lc.mu_variant == 'constant', 'loss.mu_variant',
             "with a fixed schedule the target EMA rate is constant: use mu_variant = 'constant' (mu = mu0).")
  if lc.name not in TEACHER_LOSSES + ('sct',):
    _require(config.teacher.workdir is None, 'teacher.workdir',
             f"is set, but loss.name = {lc.name!r} has no teacher (only 'cd', 'ect', 'scd' and 'sct' use one); "
             "unset it or pick --config.loss.name=cd / ect / scd / sct.")
  _require(mc.two_times == (lc.name == 'meanflow'), 'model.two_times',
           "must be True for loss.name = 'meanflow' (its network takes t and t - r) and False otherwise, got "
           f'{mc.two_times} with loss.name = {lc.name!r}.')
  if lc.name == 'meanflow':
    _require(0.0 <= lc.mf_ratio_r_neq_t <= 1.0, 'loss.mf_ratio_r_neq_t', f'must lie in [0, 1], got '
             f'{lc.mf_ratio_r_neq_t}.')
    _require(lc.mf_t_std > 0 and lc.mf_r_std > 0, 'loss.mf_t_std', 'mf_t_std and mf_r_std must be > 0.')
    _require(lc.mf_norm_p >= 0, 'loss.mf_norm_p', f'must be >= 0 (0: plain L2), got {lc.mf_norm_p}.')
    _require(lc.mf_norm_c > 0, 'loss.mf_norm_c', f'must be > 0 (MeanFlow: 1e-3 on CIFAR-10), got {lc.mf_norm_c}.')
  _require(not mc.get('null_class', False) or mc.class_conditional, 'model.null_class',
           'needs a class-conditional model (model.class_conditional = True): the null label is one more class.')
  dropout, omega, kappa = lc.get('mf_class_dropout', 0.0), lc.get('mf_cfg_omega', 1.0), lc.get('mf_cfg_kappa', 0.0)
  guided = omega != 1.0 or kappa != 0.0
  if dropout or guided:
    _require(lc.name == 'meanflow', 'loss.mf_class_dropout' if dropout else 'loss.mf_cfg_omega',
             f"classifier-free guidance folded into training is MeanFlow's (loss.name = 'meanflow'), not "
             f'{lc.name!r}; leave mf_class_dropout = 0, mf_cfg_omega = 1 and mf_cfg_kappa = 0.')
    _require(0.0 <= dropout < 1.0, 'loss.mf_class_dropout', f'must lie in [0, 1), got {dropout}.')
    _require(mc.class_conditional and mc.get('null_class', False), 'loss.mf_class_dropout',
             'drops labels to the null class: set --config.model.class_conditional=True and '
             '--config.model.null_class=True.')
  if guided:
    _require(dropout > 0, 'loss.mf_cfg_omega', f'guidance (omega = {omega}, kappa = {kappa}) mixes in the network\'s '
             'unconditional velocity, which only rows with the null label train: set loss.mf_class_dropout > 0 '
             '(the paper: 0.1).')
    _require(omega > 0 and 0.0 <= kappa < 1.0, 'loss.mf_cfg_kappa', f'needs omega > 0 and 0 <= kappa < 1 (the '
             f'guidance scale is omega / (1 - kappa)), got omega = {omega}, kappa = {kappa}.')
    t_min, t_max = lc.get('mf_cfg_t_min', 0.0), lc.get('mf_cfg_t_max', 1.0)
    _require(0.0 <= t_min < t_max <= 1.0, 'loss.mf_cfg_t_min', f'the guidance interval needs 0 <= mf_cfg_t_min < '
             f'mf_cfg_t_max <= 1, got [{t_min}, {t_max}].')
  if lc.name in ('edm', 'ect', 'sct', 'scd', 'meanflow'):
    _require(lc.target == 'stopgrad', 'loss.target',
             f"loss.name = {lc.name!r} has no target network; leave loss.target = 'stopgrad'.")
  _require(lc.tangent_warmup_steps >= 0, 'loss.tangent_warmup_steps', f'must be >= 0 (0: no warm-up), got '
           f'{lc.tangent_warmup_steps}.')
  _require(lc.tangent_c > 0, 'loss.tangent_c', f'must be > 0 (sCM: 0.1), got {lc.tangent_c}.')
  _require(not mc.adaptive_weight or lc.name in ('sct', 'scd'), 'model.adaptive_weight',
           f"is the adaptive loss weight of loss.name = 'sct' / 'scd'; loss.name = {lc.name!r} does not use it: "
           'set it to False.')
  if lc.name in TEACHER_LOSSES:
    _require(config.teacher.workdir is not None, 'teacher.workdir',
             f"loss.name = {lc.name!r} needs an EDM teacher: set --config.teacher.workdir=DIR to the workdir of a "
             "run trained with loss.name='edm' (e.g. configs/fashion_mnist_edm.py).")
  if lc.name == 'ect':
    _require(config.teacher.init_student, 'teacher.init_student',
             'ECT fine-tunes the teacher: it must start from the teacher\'s weights (set it to True).')
  if lc.name == 'sct' and config.teacher.workdir is not None:
    _require(config.teacher.init_student, 'teacher.init_student',
             "an 'sct' run reads teacher.workdir only for its first weights: set teacher.init_student = True, or "
             'unset teacher.workdir to train from random weights.')
  _require(config.sampling.diffusion_steps >= 1, 'sampling.diffusion_steps', 'must be >= 1.')

  _require(0.0 <= mc.dropout < 1.0, 'model.dropout', f'must lie in [0, 1), got {mc.dropout}.')
  _require(len(mc.ch_mult) >= 1 and mc.ch >= 1, 'model.ch_mult', 'need at least one level and ch >= 1.')
  for channels in (mc.ch,) + tuple(mc.ch * mult for mult in mc.ch_mult):  # Decoder inputs are sums of these.
    _require(channels % mc.num_groups == 0, 'model.num_groups',
             f'{mc.num_groups} groups do not divide {channels} channels (ch and ch * ch_mult).')
  _require(mc.ch % 2 == 0, 'model.ch', 'must be even (it is the time-embedding size).')
  dc = config.data
  if dc.name in MNIST_FAMILY:
    _require(dc.image_size == 0, 'data.image_size',
             f'{dc.name} images stay 28x28 (set 0); pad them with data.pad_to (e.g. 32) instead.')
    _require(dc.pad_to == 0 or dc.pad_to >= 28, 'data.pad_to', f'must be 0 or at least 28, got {dc.pad_to}.')
  else:
    _require(dc.pad_to == 0, 'data.pad_to', f'pads the 28x28 MNIST-family images; for {dc.name!r} set '
             'data.image_size instead.')
    _require(dc.image_size >= 0, 'data.image_size', f'must be >= 0 (0: the dataset\'s default), got {dc.image_size}.')
  storage = dc.get('storage', 'memory')
  if dc.name == 'image_folder' and storage == 'prepared':
    _require(dc.get('prepared_dir', None) is not None, 'data.prepared_dir',
             "data.storage = 'prepared' reads a folder decoded by `python -m cm_jax.prepare`: set "
             '--config.data.prepared_dir=DIR.')
  elif dc.name == 'image_folder':
    _require(dc.manual_dir is not None, 'data.manual_dir',
             "data.name = 'image_folder' needs --config.data.manual_dir=DIR, a directory of class subdirectories "
             'holding JPEG/PNG images.')
  else:
    _require(dc.class_map is None, 'data.class_map', f"is for data.name = 'image_folder', not {dc.name!r}.")
    _require(storage != 'prepared', 'data.storage',
             f"'prepared' is for image folders (python -m cm_jax.prepare); {dc.name!r} uses 'memory' or 'stream'.")
  _require(dc.get('decode_workers', 0) >= -1, 'data.decode_workers',
           f'must be -1 (one process per core), 0 (threads) or a number of processes, got '
           f'{dc.get("decode_workers", 0)}.')
  if mc.class_conditional:
    _require(mc.num_classes == 0 or mc.num_classes >= 2, 'model.num_classes',
             f'a class-conditional model needs the number of classes (>= 2; 0: the data\'s), got {mc.num_classes}.')
  size = catalog.image_shape(dc)[0]
  _require(mc.patch_size >= 1, 'model.patch_size', f'must be >= 1 (1: no patches), got {mc.patch_size}.')
  _require(size % mc.patch_size == 0, 'model.patch_size',
           f'the image size {size} does not divide by the patch size {mc.patch_size}.')
  size //= mc.patch_size
  factor = 2 ** (len(mc.ch_mult) - 1)
  _require(size % factor == 0, 'model.ch_mult',
           f'{len(mc.ch_mult)} levels halve the image {len(mc.ch_mult) - 1} times, but size {size} (after '
           f'model.patch_size) does not '
           f'divide by {factor}; use fewer levels, or another data.image_size (data.pad_to for the MNIST '
           'family, e.g. 32).')
  _require(config.optim.lr > 0, 'optim.lr', 'must be > 0.')
  for field, value in config_lib.flatten_dict(config.to_dict()).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise errors.ConfigError(f'config.{field}: must be a finite number, got {value}.')
  _require(0 <= config.seed < 2 ** 63, 'seed', f'must be an integer from 0 to 2**63 - 1, got {config.seed}.')
  ev = config.evaluation
  _require(ev.every >= 0, 'evaluation.every', f'must be >= 0 (0: no in-training evaluation), got {ev.every}.')
  if ev.every:
    if config.data.name == 'image_folder':
      _require(ev.reference_split != 'test', 'evaluation.reference_split',
               "an image folder has only a 'train' split: set --config.evaluation.reference_split=train.")
    _require(ev.num_samples >= 2, 'evaluation.num_samples', f'must be >= 2, got {ev.num_samples}.')
  for field in ('batch_size', 'pr_k', 'classifier_steps', 'classifier_batch_size'):
    _require(ev[field] >= 1, f'evaluation.{field}', f'must be >= 1, got {ev[field]}.')
  _require(ev.num_reference >= 0, 'evaluation.num_reference', 'must be >= 0 (0: the whole split).')
  _require(ev.classifier_lr > 0, 'evaluation.classifier_lr', 'must be > 0.')
  if ev.feature_net == 'classifier':  # Trained on the labelled train split, held in memory.
    _require(config.data.name in MNIST_FAMILY or config.data.get('storage', 'memory') in ('memory', 'prepared'),
             'evaluation.feature_net', f"'classifier' trains on the whole {config.data.name!r} train split in "
             "host memory; set --config.data.storage=memory, or use 'inception'.")
  _require(config.optim.warmup_steps >= 0 and config.optim.grad_clip >= 0, 'optim.warmup_steps',
           'warmup_steps and grad_clip must be >= 0.')


def validate_num_classes(model_classes: int, data_classes: int, data_name: str) -> None:
  """A class-conditional model must have exactly the dataset's number of classes."""
  if model_classes != data_classes:
    raise ValueError(f'config.model.num_classes = {model_classes}, but the {data_name} training data has '
                     f'{data_classes} classes; set --config.model.num_classes={data_classes}.')


def validate_batch(batch_size: int, device_count: int, process_count: int) -> None:
  """The global batch must split evenly over devices (and processes)."""
  if batch_size % device_count or batch_size % process_count:
    raise ValueError(
        f'config.training.batch_size = {batch_size} does not divide by the {device_count} devices '
        f'({process_count} processes); use a multiple of {device_count}, e.g. '
        f'--config.training.batch_size={max(device_count, batch_size // device_count * device_count)}.')
