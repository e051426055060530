"""Shared pieces of the experiment configs: recipe helpers (apply_ict, apply_ct2023, apply_edm, apply_cd, apply_ect,
apply_scm), the ADM network layout (apply_adm_unet), and configs as data (flatten_dict, config_from_json_dict).

A recipe helper sets, on a config of configs/default.py or one derived from it, the fields that a published
training recipe fixes whatever the dataset: the loss and what goes with it (the optimizer family; the teacher
and the student's dropout for CD; the sampler for EDM). Its arguments are what the recipe leaves to the dataset.
A paper config calls one helper on its base and then states only its own choices (network, data, learning rate,
budget), so a field set after the helper overrides it. Each helper sets only fields that configs/default.py
declares, and leaves every other field as the base has it.

apply_adm_unet does the same for a network: the layout knobs that ADM fixes, with the size as arguments.

Not a config: it has no get_config(). Imported by the config files, so it imports only ml_collections and the
standard library (config_from_json_dict reads configs/default.py when called).
"""

from typing import Optional, Tuple

import ml_collections


def apply_ict(config: ml_collections.ConfigDict, *, s1: int = 1280) -> ml_collections.ConfigDict:
  """Improved consistency training (iCT, Song & Dhariwal 2023); its loss fields are configs/default.py's defaults.

  Sets loss.name = 'ct' and, from the iCT paper:
    loss.schedule = 'exponential', loss.s0 = 10, loss.s1 = s1: the curriculum N(k) doubles from 10 to s1
      (iCT: 1280; a short run may stop earlier);
    loss.index_distribution = 'lognormal', loss.p_mean = -1.1, loss.p_std = 2.0: the discretised lognormal
      noise index;
    loss.distance = 'pseudo_huber' (c from loss.huber_c, left as it is: None is iCT's 0.00054 sqrt(d));
    loss.weighting = 'inverse_delta': weight 1 / (sigma_{n+1} - sigma_n);
    loss.target = 'stopgrad': no target EMA (iCT drops it);
    optim.name = 'adam': iCT trains with Adam (learning rate and warm-up are the config's).
  Returns config (changed in place).
  """
  loss = config.loss
  loss.name = 'ct'
  loss.schedule = 'exponential'
  loss.s0 = 10
  loss.s1 = s1
  loss.index_distribution = 'lognormal'
  loss.p_mean = -1.1
  loss.p_std = 2.0
  loss.distance = 'pseudo_huber'
  loss.weighting = 'inverse_delta'
  loss.target = 'stopgrad'
  config.optim.name = 'adam'
  return config


def apply_ct2023(config: ml_collections.ConfigDict, *, s1: int, mu0: float,
                 mu_variant: str) -> ml_collections.ConfigDict:
  """The original consistency training (CT of CM, Song et al. 2023).

  Sets loss.name = 'ct' and, from the CM paper and its code (openai/consistency_models):
    loss.schedule = 'adaptive', loss.s0 = 2, loss.s1 = s1: CM's N(k) from 2 to s1 (CM: 150 on CIFAR-10, 200
      on ImageNet 64x64);
    loss.target = 'ema', loss.mu0 = mu0, loss.mu_variant = mu_variant: the target EMA mu(k) (CM: mu0 0.9 on
      CIFAR-10, 0.95 on ImageNet 64x64; 'paper' is the paper's formula, 'official' the code's);
    loss.index_distribution = 'uniform': n uniform over the grid;
    loss.distance = 'l2': CM's best used LPIPS, which cm_jax does not ship (it leaks ImageNet features into
      the Inception FID);
    loss.weighting = 'uniform': every pair weighs 1;
    optim.name = 'radam': CM trains with RAdam (learning rate and warm-up are the config's).
  Returns config (changed in place).
  """
  loss = config.loss
  loss.name = 'ct'
  loss.schedule = 'adaptive'
  loss.s0 = 2
  loss.s1 = s1
  loss.index_distribution = 'uniform'
  loss.distance = 'l2'
  loss.weighting = 'uniform'
  loss.target = 'ema'
  loss.mu0 = mu0
  loss.mu_variant = mu_variant
  config.optim.name = 'radam'
  return config


def apply_edm(config: ml_collections.ConfigDict, *, diffusion_steps: int) -> ml_collections.ConfigDict:
  """An EDM diffusion teacher (Karras et al. 2022): the network that CD distils and ECT starts from.

  Sets, from the EDM paper:
    loss.name = 'edm', loss.edm_p_mean = -1.2, loss.edm_p_std = 1.2: ln sigma ~ N(-1.2, 1.2^2), EDM's
      training noise (weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 is part of loss 'edm');
    optim.name = 'adam': EDM trains with Adam (learning rate and warm-up are the config's);
    sampling.diffusion_solver = 'heun', sampling.diffusion_steps = diffusion_steps: EDM's Heun sampler
      (Algorithm 1) on a Karras grid of that many steps (EDM: 18 at 32x32; CM's ImageNet-64 teacher: 40).
  Returns config (changed in place).
  """
  config.loss.name = 'edm'
  config.loss.edm_p_mean = -1.2
  config.loss.edm_p_std = 1.2
  config.optim.name = 'adam'
  config.sampling.diffusion_solver = 'heun'
  config.sampling.diffusion_steps = diffusion_steps
  return config


def apply_cd(config: ml_collections.ConfigDict, *, num_points: int, target: str = 'stopgrad',
             mu0: Optional[float] = None) -> ml_collections.ConfigDict:
  """Consistency distillation (CD of CM, Song et al. 2023) from the EDM teacher in config.teacher.workdir.

  The teacher's workdir is left to the command line (--config.teacher.workdir=TEACHER). Sets loss.name = 'cd'
  and, from the CM paper and its code (configs/cifar10_ve_cd.py, scripts/launch.sh):
    loss.schedule = 'fixed', loss.num_points = num_points: one grid of N points throughout (CM: 18 on
      CIFAR-10, 40 on ImageNet 64x64);
    loss.target = target: 'stopgrad' (mu = 0, CM's CIFAR-10 CD; loss.mu0 and loss.mu_variant are then left as
      they are) or 'ema' with loss.mu0 = mu0 and loss.mu_variant = 'constant' (CM's ImageNet-64 CD: 0.95);
    loss.index_distribution = 'uniform', loss.distance = 'l2', loss.weighting = 'uniform': as CM's l2 CD
      (its best used LPIPS, which cm_jax does not ship);
    teacher.solver = 'heun': one Heun step of the teacher between neighbouring grid points;
    teacher.init_student = True: the student starts from the teacher's weights (CM's code: finetune), so
      config.model must equal the teacher's except dropout;
    model.dropout = 0.0: CM's CD students train without dropout (the teacher's is switched off);
    optim.name = 'radam': CM trains with RAdam (learning rate and warm-up are the config's).
  Returns config (changed in place).
  """
  if target not in ('stopgrad', 'ema') or (target == 'ema') != (mu0 is not None):
    raise ValueError(f"apply_cd: target='stopgrad' without mu0, or target='ema' with mu0; got {target!r}, {mu0}.")
  loss = config.loss
  loss.name = 'cd'
  loss.schedule = 'fixed'
  loss.num_points = num_points
  loss.index_distribution = 'uniform'
  loss.distance = 'l2'
  loss.weighting = 'uniform'
  loss.target = target
  if target == 'ema':
    loss.mu0 = mu0
    loss.mu_variant = 'constant'  # A fixed grid has no N(k) for CM's adaptive mu(k).
  config.teacher.solver = 'heun'
  config.teacher.init_student = True
  config.model.dropout = 0.0
  config.optim.name = 'radam'
  return config


def apply_ect(config: ml_collections.ConfigDict, *, stage_steps: int) -> ml_collections.ConfigDict:
  """Easy consistency tuning (ECT, Geng et al. 2024), fine-tuning the EDM teacher in config.teacher.workdir.

  The teacher's workdir is left to the command line (--config.teacher.workdir=TEACHER). Sets loss.name = 'ect'
  and, from the ECT paper and its code (run_ecm.sh, ct_train.py):
    loss.p_mean = -1.1, loss.p_std = 2.0: t ~ lognormal(-1.1, 2.0);
    loss.ect_q = 2.0, loss.ect_k = 8.0, loss.ect_b = 1.0: r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t)));
    loss.ect_stage_steps = stage_steps: training steps per stage (the gap t - r halves at each stage);
    loss.distance = 'l2_norm', loss.weighting = 'inverse_delta': ||f(x_t, t) - stopgrad f(x_r, r)||_2 / (t - r)
      (ECT's current code weights by (t^2 + sigma_data^2) / (t sigma_data)^2 instead: loss.weighting 'edm');
    teacher.init_student = True: ECT starts from the teacher's weights by definition;
    optim.name = 'radam': ECT's code trains with RAdam (learning rate and warm-up are the config's).
  Returns config (changed in place).
  """
  loss = config.loss
  loss.name = 'ect'
  loss.p_mean = -1.1
  loss.p_std = 2.0
  loss.ect_q = 2.0
  loss.ect_k = 8.0
  loss.ect_b = 1.0
  loss.ect_stage_steps = stage_steps
  loss.distance = 'l2_norm'
  loss.weighting = 'inverse_delta'
  config.teacher.init_student = True
  config.optim.name = 'radam'
  return config


def apply_scm(config: ml_collections.ConfigDict, *, tangent_warmup_steps: int) -> ml_collections.ConfigDict:
  """Continuous-time consistency models (sCM, Lu & Song 2024): sCT, or sCD when loss.name is already 'scd'.

  Keeps loss.name 'scd' (distillation from the EDM teacher in config.teacher.workdir, left to the command line)
  and otherwise sets 'sct' (training from data; a teacher.workdir, if given, supplies only the first weights),
  and from the sCM paper (Algorithm 1 and its CIFAR-10 settings, appendix G.2):
    loss.p_mean = -1.0, loss.p_std = 1.4: ln sigma ~ N(-1.0, 1.4^2), t = arctan(sigma / sigma_data);
    loss.tangent_warmup_steps = tangent_warmup_steps (sCM: 10k), loss.tangent_c = 0.1: the tangent's
      warm-up and normalisation;
    loss.target = 'stopgrad': the target is the online network (no target EMA);
    model.adaptive_weight = True: the learned adaptive weight e^-phi(t) ||.||^2 / D + phi(t);
    optim.name = 'radam', optim.b1 = 0.9, optim.b2 = 0.99, optim.eps = 1e-8 (learning rate and warm-up are
      the config's);
    teacher.init_student = True: sCM starts both sCT and sCD from the teacher's EMA weights;
    for 'scd', model.dropout = 0.0 (sCM disables dropout for sCD; sCT keeps the config's).
  Returns config (changed in place).
  """
  loss = config.loss
  loss.name = 'scd' if loss.name == 'scd' else 'sct'
  loss.p_mean = -1.0
  loss.p_std = 1.4
  loss.tangent_warmup_steps = tangent_warmup_steps
  loss.tangent_c = 0.1
  loss.target = 'stopgrad'
  config.model.adaptive_weight = True
  config.optim.name = 'radam'
  config.optim.b1 = 0.9
  config.optim.b2 = 0.99
  config.optim.eps = 1e-8
  config.teacher.init_student = True
  if loss.name == 'scd':
    config.model.dropout = 0.0
  return config


def apply_adm_unet(config: ml_collections.ConfigDict, *, ch: int, ch_mult: Tuple[int, ...], num_res_blocks: int,
                   attn_resolutions: Tuple[int, ...]) -> ml_collections.ConfigDict:
  """An ADM-style UNet (Dhariwal & Nichol 2021), the network of CM's ImageNet-64 runs, at a given size.

  Sets model.ch, model.ch_mult, model.num_res_blocks and model.attn_resolutions (the size) and, from ADM:
    model.head_channels = 64: attention heads of 64 channels;
    model.scale_shift = True: the time (and class) embedding scales and shifts the GroupNorm of each block;
    model.resblock_updown = True: BigGAN-style down/upsampling inside residual blocks;
    model.num_groups = 32: GroupNorm with 32 groups;
  and, cm_jax's choice where ADM embeds the noise level with positional features:
    model.embedding = 'fourier', model.fourier_scale = 0.02: iCT's Fourier features, as every natural-image
      config of cm_jax, so that CT, EDM teacher and its students share one network.
  Dropout and class conditioning are the config's. Returns config (changed in place).
  """
  model = config.model
  model.ch = ch
  model.ch_mult = ch_mult
  model.num_res_blocks = num_res_blocks
  model.attn_resolutions = attn_resolutions
  model.head_channels = 64
  model.scale_shift = True
  model.resblock_updown = True
  model.num_groups = 32
  model.embedding = 'fourier'
  model.fourier_scale = 0.02
  return config


# ----------------------------------------------------------------------------------------------------------
# Configs as data: flat keys for logs and comparisons, and the ConfigDict back from a checkpoint's JSON.
# ----------------------------------------------------------------------------------------------------------
def flatten_dict(d: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def config_from_json_dict(d: dict) -> ml_collections.ConfigDict:
  """ConfigDict from its JSON form, on top of cm_jax/configs/default.py.

  Lists become tuples again (configs use tuples for sequences); fields added to cm_jax after the
  checkpoint was written take their defaults, so older runs stay loadable.
  """
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v

  def merge(base: dict, saved: dict) -> dict:
    out = dict(base)
    for k, v in saved.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out

  d = fix(d)
  training = d.get('training', {})
  if isinstance(training.get('ema_warmup'), bool):  # Before 2026-11-29 a bool: True was today's 'capped'.
    training['ema_warmup'] = 'capped' if training['ema_warmup'] else 'none'
  from cm_jax.configs import default  # pylint: disable=g-import-not-at-top  (default.py may use these helpers)
  return ml_collections.ConfigDict(merge(default.get_config().to_dict(), d))


MEANFLOW_RECIPES = ('paper', 'improved')


def apply_meanflow(config: ml_collections.ConfigDict, *, recipe: str) -> ml_collections.ConfigDict:
  """MeanFlow (Geng et al. 2025, arXiv 2505.13447): a flow map trained from data (cm_jax/core/meanflow.py).

  Sets loss.name = 'meanflow'; loss.target = 'stopgrad' (the target is the online network under stop-gradient);
  model.two_times = True (the network sees t and t - r, each embedded, summed: the paper's (t, t - r));
  model.adaptive_weight = False; model.embedding = 'positional' with model.positional_scale = 1 (sinusoidal
  features of t in [0, 1] itself, as both official codes: no x1000); optim.name = 'adam' with optim.b1 = 0.9,
  optim.b2 = 0.999; sampling.start_t = None and sampling.two_step_t = 0.5 (cm_jax's choice: the paper's two-step
  grid is not in its public code; improved MeanFlow samples n steps on equal jumps); and from the official
  PyTorch CIFAR-10 code (Gsunshine/py-meanflow, whose README names scripts/cifar10_v0.sh as the paper's
  configuration) the time proposals of `recipe`:
    'paper' (cifar10_v0.sh): loss.mf_time_order = 'sort', loss.mf_t_mean = -2.0, loss.mf_t_std = 2.0 (t and r
      both logit-normal(-2.0, 2.0), sorted, t the larger);
    'improved' (cifar10_v1.sh): loss.mf_time_order = 'min', loss.mf_t_mean = -0.6, loss.mf_t_std = 1.6,
      loss.mf_r_mean = -4.0, loss.mf_r_std = 1.6 (r = min(r, t));
  and for both loss.mf_ratio_r_neq_t = 0.75 (r is set to t in 25% of the rows), loss.mf_norm_p = 0.75 and
  loss.mf_norm_c = 1e-3 (adaptive weight 1 / (||err||^2 + 1e-3)^0.75). Learning rate, warm-up, dropout, batch,
  steps and EMA are the config's. Returns config (changed in place).
  """
  if recipe not in MEANFLOW_RECIPES:
    raise ValueError(f'MeanFlow recipe {recipe!r} is not one of {MEANFLOW_RECIPES}.')
  loss = config.loss
  loss.name = 'meanflow'
  loss.target = 'stopgrad'
  if recipe == 'paper':
    loss.mf_time_order, loss.mf_t_mean, loss.mf_t_std = 'sort', -2.0, 2.0
  else:
    loss.mf_time_order, loss.mf_t_mean, loss.mf_t_std, loss.mf_r_mean, loss.mf_r_std = 'min', -0.6, 1.6, -4.0, 1.6
  loss.mf_ratio_r_neq_t = 0.75
  loss.mf_norm_p = 0.75
  loss.mf_norm_c = 1e-3
  config.model.two_times = True
  config.model.adaptive_weight = False
  config.model.embedding = 'positional'
  config.model.positional_scale = 1.0
  config.optim.name = 'adam'
  config.optim.b1, config.optim.b2 = 0.9, 0.999
  config.sampling.start_t = None
  config.sampling.two_step_t = 0.5
  return config
