"""Every knob of cm_jax, with its default. Experiment configs start from this and change a few fields.

Override any field on the command line, e.g. `--config.optim.lr=2e-4 --config.training.batch_size=64`;
values are type-checked and unknown keys fail. The defaults are the iCT recipe (Song & Dhariwal 2023) on
Fashion-MNIST at a size that trains on a CPU; see configs/*.py for experiments.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Root of all randomness: parameter init, the data order, noise of every step, eval sample grids.
  config.seed = 0

  # ---------------------------------------------------------------------------------------------
  # data: what to train on and where it comes from.
  # ---------------------------------------------------------------------------------------------
  data = config.data = ml_collections.ConfigDict()
  # 'mnist' | 'fashion_mnist' (28x28 gray) | 'cifar10' (32x32 RGB, TFDS) | 'imagenette' (RGB, TFDS builder
  # config data.tfds_config) | 'imagenet64' (TFDS imagenet_resized/64x64, prepared by hand: see README) |
  # 'image_folder' (data.manual_dir = a directory of class subdirectories of JPEG/PNG files).
  data.name = 'fashion_mnist'
  # 'auto': manual_dir if set, else TFDS if already prepared in data_dir, else the standard local directory
  #         /usr/share/datasets/<name> (Debian's dataset-fashion-mnist), else a TFDS download; every step is
  #         logged and the error lists what was tried. 'tfds': TFDS only. 'local': local files only.
  data.source = 'auto'
  # MNIST family: a directory with the four IDX files (.gz or raw). image_folder: the root of the class folders.
  data.manual_dir = ml_collections.config_dict.placeholder(str)
  data.data_dir = ml_collections.config_dict.placeholder(str)    # TFDS data_dir (None: TFDS's default).
  data.tfds_config = ml_collections.config_dict.placeholder(str)  # TFDS builder config; None: cm_jax's choice
                                  # per dataset (imagenette: '160px-v2').
  # Side of the square training images. 0: the dataset's own (28 MNIST family, 32 CIFAR-10, 64 ImageNet 64x64)
  # or 64 for imagenette and image folders. Images of another size are centre-cropped to a square and resized
  # (area-averaged down, bicubic up).
  data.image_size = 0
  # image_folder: JSON file {folder name: label} that merges class folders into superclasses (e.g. ImageNet-9
  # from an ImageNet train folder; folders it does not name are left out). None: one class per subdirectory,
  # labels in sorted folder-name order.
  data.class_map = ml_collections.config_dict.placeholder(str)
  # 'memory': decode the whole split into host memory as uint8 (fast; MNIST, CIFAR-10, Imagenette).
  # 'stream': read each step's examples from disk by index (TFDS ArrayRecord data_source, or the image files),
  #           each process only its share, for data larger than host memory (ImageNet 64x64 is ~16 GB).
  # 'prepared': image folders only: the rows of data.prepared_dir, a folder decoded once by `python -m
  #           cm_jax.prepare` into a memory-mapped array (checked against its SHA-256s when opened).
  # Either way the batch of step k is a function of (seed, k), so resuming stays exact; the three storages of an
  # image folder give the same rows, so a run may switch storage when resumed.
  data.storage = 'memory'
  data.prepared_dir = ml_collections.config_dict.placeholder(str)  # data.storage = 'prepared': its directory.
  data.skip_unreadable = False    # 'stream' image folders: every file's header is read before step 0; an
                                  # unreadable one stops the run naming it, or with True is listed and left out.
  data.decode_workers = 0         # Image folders: processes decoding JPEG/PNG files (0: up to 16 threads in the
                                  # training process; -1: one process per core this process may use, i.e. its
                                  # CPU affinity, which SLURM narrows per task; N). Processes scale with the
                                  # cores where threads stop at a few hundred images/s; the rows are the same.
  data.jpeg_draft = False         # Image folders: let the JPEG decoder scale large photographs down by 2-8x
                                  # while decoding (several times faster; the pixels differ from the full decode
                                  # by up to tens of levels on fine texture, so it is a different dataset: the
                                  # data fingerprint records it). benchmarks/reader.py measures both.
  data.pad_to = 0                 # MNIST family: 0 keeps 28x28; 32 zero-pads (black) to 32x32.
  data.random_flip = False        # Random horizontal flips in training (sensible for garments and photos, not
                                  # digits).

  # ---------------------------------------------------------------------------------------------
  # consistency: the noise range and parameterization (CM paper constants; images live in [-1, 1]).
  # ---------------------------------------------------------------------------------------------
  cons = config.consistency = ml_collections.ConfigDict()
  cons.sigma_min = 0.002          # eps: f(x, eps) = x exactly.
  cons.sigma_max = 80.0           # T: one-step sampling starts from T z.
  cons.rho = 7.0                  # Karras grid curvature.
  cons.sigma_data = 0.5           # Data standard deviation used by c_skip, c_out, c_in: 0.5 for CIFAR-10 and
                                  # ImageNet (EDM, CM); the MNIST family's configs set their own (Fashion-MNIST's
                                  # std in [-1, 1] is 0.71, MNIST's 0.62).

  # ---------------------------------------------------------------------------------------------
  # model: the raw network F inside f = c_skip x + c_out F(c_in x, c_noise), c_noise = 0.25 ln sigma.
  # ---------------------------------------------------------------------------------------------
  model = config.model = ml_collections.ConfigDict()
  model.name = 'unet'             # Only 'unet' for now.
  model.ch = 32                   # Base channel count.
  model.ch_mult = (1, 2, 2)       # Channel multiplier per resolution level; image size must divide by 2^(levels-1).
  model.num_res_blocks = 1        # Residual blocks per level (the decoder has one more).
  model.attn_resolutions = (7,)   # Resolutions (feature-map height) with self-attention; the middle always has one.
  model.dropout = 0.1             # Dropout in residual blocks; student and target share the mask.
  model.num_groups = 8            # GroupNorm groups; must divide every channel count.
  model.embedding = 'fourier'     # 'fourier' (random Fourier features) | 'positional' (sinusoidal).
  model.fourier_scale = 0.02      # Fourier frequency std: 16 in CM's official code, 0.02 in iCT.
  model.positional_scale = 1000.0 # Positional embedding of positional_scale * c_noise (PyTorch CM code).
  model.head_channels = 0         # Attention: 0 for one head; > 0 for heads of this many channels (ADM: 64).
  model.scale_shift = False       # ADM's scale-shift norm: the time (and class) embedding scales and shifts
                                  # the second GroupNorm of each residual block instead of being added.
  model.resblock_updown = False   # Down/upsample inside residual blocks (BigGAN-style, as DDPM++ and ADM)
                                  # instead of a strided / nearest-neighbour convolution between levels.
  model.class_conditional = False # Add a learned class embedding to the time embedding; training then reads
                                  # the dataset's labels and sampling takes labels (or draws them uniformly).
  model.num_classes = 0           # Number of classes when class_conditional (CIFAR-10 10, ImageNet 1000); 0: the
                                  # training data's (an image folder's class folders or class map).
  model.patch_size = 1            # > 1: the network runs on p x p patches (space-to-depth in, depth-to-space
                                  # out), so its first level is at H/p: p^2 times fewer positions per layer.
  # sCM's learned adaptive loss weight (loss 'sct' / 'scd'): a small float32 head phi(c_noise) (a linear map of
  # 128 Fourier features of the noise level), trained, saved and restored with the network and ignored by
  # sampling. The loss is then e^-phi(t) ||.||^2 / D + phi(t); False: weight 1 (phi = 0).
  model.adaptive_weight = False
  model.two_times = False         # A second time input (MeanFlow's interval t - r), embedded like the first by its
                                  # own MLP and added to the time embedding; loss.name = 'meanflow' needs it.
  model.null_class = False        # Class-conditional networks: one more label, index num_classes, meaning "no
                                  # class" (classifier-free guidance; loss.mf_class_dropout trains it).

  # ---------------------------------------------------------------------------------------------
  # loss: the training objective. Defaults: iCT. For CM (2023) CT: schedule='adaptive',
  # index_distribution='uniform', distance='l2', weighting='uniform', target='ema' (configs/fashion_mnist_ct2023.py).
  # ---------------------------------------------------------------------------------------------
  loss = config.loss = ml_collections.ConfigDict()
  # 'ct': consistency training from data. 'edm': EDM diffusion loss (trains a teacher; sampled with Heun/Euler).
  # 'cd': consistency distillation from the EDM teacher in teacher.workdir. 'ect': easy consistency tuning,
  # fine-tuning the teacher's weights into a consistency model (Geng et al. 2024). 'sct' / 'scd': continuous-time
  # consistency training from data / distillation from the EDM teacher (sCM, Lu & Song 2024; TrigFlow time on
  # cm_jax's EDM preconditioning without the sigma_min shift, see cm_jax/core/scm.py). 'meanflow': MeanFlow (Geng
  # et al. 2025), a flow map trained from data on the linear path z_t = (1 - t) x + t e (cm_jax/core/meanflow.py;
  # its network takes (t, t - r): model.two_times = True; no preconditioning, consistency.* unused).
  loss.name = 'ct'
  # N(k), for 'ct' and 'cd': 'exponential' (iCT curriculum) | 'adaptive' (CM appendix C) | 'fixed' (num_points).
  loss.schedule = 'exponential'
  loss.s0 = 10                    # Initial discretisation (iCT 10, CM 2).
  loss.s1 = 1280                  # Final discretisation (iCT 1280, CM 150).
  loss.num_points = 18            # N of schedule 'fixed' (CM CD: 18 on CIFAR-10, 40 on ImageNet64).
  loss.total_steps = ml_collections.config_dict.placeholder(int)  # K of N(k), mu(k); None: training.num_steps
                                  # of the run's first start (pinned, recorded in its checkpoints; see below).
  loss.index_distribution = 'lognormal'  # 'lognormal' (iCT, discretised) | 'uniform' (CM).
  loss.p_mean = -1.1              # Lognormal mean of ln sigma: iCT index distribution, ECT's t, sCM's sigma
                                  # (sCM: -1.0, with t = arctan(sigma / sigma_data)).
  loss.p_std = 2.0                # Lognormal std of ln sigma (iCT and ECT 2.0; sCM 1.4).
  # Per-sample distance: 'pseudo_huber' (iCT, over the whole sample) | 'l2' | 'l1' (means over pixels) |
  # 'l2_norm' (||.||_2 of the whole sample; ECT, = pseudo-Huber with c = 0).
  loss.distance = 'pseudo_huber'
  loss.huber_c = ml_collections.config_dict.placeholder(float)  # None: 0.00054 sqrt(H W C).
  # Weight of a pair (lo, hi): 'inverse_delta': 1/(hi - lo) (iCT; ECT's 1/(t - r)) | 'uniform' (CM) |
  # 'edm': (hi^2 + sigma_data^2) / (hi sigma_data)^2 (the later ECT code's weighting).
  loss.weighting = 'inverse_delta'
  loss.target = 'stopgrad'        # 'ct'/'cd': 'stopgrad': mu = 0 (iCT; CM's CIFAR-10 CD) | 'ema': target EMA mu.
  loss.mu0 = 0.9                  # CM mu0 (used when target = 'ema').
  # mu with target = 'ema': 'paper': exp(s0 ln mu0 / N) | 'official': exp(s0 ln mu0 / (N - 1)) |
  # 'constant': mu0 (CM's ImageNet/LSUN CD: 0.95).
  loss.mu_variant = 'paper'
  loss.edm_p_mean = -1.2          # 'edm': ln sigma ~ N(edm_p_mean, edm_p_std^2) (EDM paper).
  loss.edm_p_std = 1.2
  loss.ect_q = 2.0                # 'ect': r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clipped at 0.
  loss.ect_k = 8.0
  loss.ect_b = 1.0
  loss.ect_stage_steps = 2000     # 'ect': training steps per stage (the stage doubling interval).
  # 'sct' / 'scd': the tangent g = cos t df/dt of the target enters with its time-derivative part scaled by
  # min(1, k / tangent_warmup_steps) (tangent warm-up; 0: none), and is normalised to g / (rms(g) + tangent_c),
  # rms(g) = ||g||_2 / sqrt(D) (sCM: warm-up 10k steps, c = 0.1).
  loss.tangent_warmup_steps = 10_000
  loss.tangent_c = 0.1
  # 'meanflow': t ~ sigmoid(N(mf_t_mean, mf_t_std^2)); order 'min' (py-meanflow's improved CIFAR-10 recipe): r ~
  # sigmoid(N(mf_r_mean, mf_r_std^2)), r = min(r, t); order 'sort' (the paper's runs): r drawn like t, the two
  # sorted (t the larger; mf_r_* unused). r is set to t (flow matching) in a fraction 1 - mf_ratio_r_neq_t of the
  # rows, drawn per row. Per-example loss ||u - sg(target)||^2 (summed over pixels) divided by
  # sg((||.||^2 + mf_norm_c)^mf_norm_p).
  loss.mf_t_mean = -0.6
  loss.mf_t_std = 1.6
  loss.mf_r_mean = -4.0
  loss.mf_r_std = 1.6
  loss.mf_time_order = 'min'
  loss.mf_ratio_r_neq_t = 0.75
  loss.mf_norm_p = 0.75
  loss.mf_norm_c = 1e-3
  # MeanFlow's classifier-free guidance folded into training (class-conditional runs with model.null_class; the
  # paper's ImageNet runs). A fraction mf_class_dropout of the rows trains with the null label and the plain
  # target; in the other rows with mf_cfg_t_min <= t <= mf_cfg_t_max the velocity v (the jvp's tangent and the
  # target's first term) becomes v_g = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null),
  # the u terms from the online network without dropout, under stop-gradient. One-step samples then carry the
  # guidance of scale omega / (1 - kappa) at no sampling cost. omega = 1, kappa = 0: no guidance (no extra call).
  # The paper's ImageNet B/2: dropout 0.1, omega 1.0, kappa 0.5, interval [0, 1]; XL/2: omega 0.2, kappa 0.92, [0, 0.75].
  loss.mf_class_dropout = 0.0
  loss.mf_cfg_omega = 1.0
  loss.mf_cfg_kappa = 0.0
  loss.mf_cfg_t_min = 0.0
  loss.mf_cfg_t_max = 1.0

  # ---------------------------------------------------------------------------------------------
  # teacher: the EDM run that 'cd' distils and 'ect' starts from (a cm_jax workdir trained with loss.name='edm').
  # ---------------------------------------------------------------------------------------------
  teacher = config.teacher = ml_collections.ConfigDict()
  teacher.workdir = ml_collections.config_dict.placeholder(str)  # Required for 'cd', 'ect' and 'scd'; optional
                                  # for 'sct' (its first weights only, as sCM's runs); read only.
  teacher.step = ml_collections.config_dict.placeholder(int)     # Checkpoint step; None: the latest.
  teacher.ema = ml_collections.config_dict.placeholder(float)    # Teacher EMA rate; None: its first sampling EMA.
  teacher.solver = 'heun'         # 'cd': ODE step of the teacher between grid points, 'heun' (CM) | 'euler'.
  # Start the student (and its EMAs and target) from the teacher's weights: True for ECT by definition and the
  # default for CD, as in CM's official CD runs: the teacher already denoises well, so the student converges
  # far sooner than from random weights. The student's config.model must then equal the teacher's.
  # False: random initialisation (any student architecture).
  teacher.init_student = True

  # ---------------------------------------------------------------------------------------------
  # optim: optax optimizer; the learning rate is a function of the step.
  # ---------------------------------------------------------------------------------------------
  optim = config.optim = ml_collections.ConfigDict()
  optim.name = 'radam'            # 'adam' | 'radam'.
  optim.lr = 4e-4                 # Peak learning rate.
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.warmup_steps = 0          # Linear warm-up from 0 to lr over this many steps.
  optim.decay = 'constant'        # After warm-up: 'constant' | 'cosine' (to 0 at optim.decay_steps).
  optim.decay_steps = ml_collections.config_dict.placeholder(int)  # End of the cosine; None: training.num_steps
                                  # of the run's first start (pinned like loss.total_steps).
  optim.grad_clip = 0.0           # Global-norm gradient clipping; 0 disables. (Losses average over pixels, so
                                  # gradients are H*W*C times smaller than with the pixel sums of EDM's code.)

  # ---------------------------------------------------------------------------------------------
  # training: the loop.
  # ---------------------------------------------------------------------------------------------
  training = config.training = ml_collections.ConfigDict()
  training.num_steps = 10_000     # Total steps of the run; raise it and restart to continue a finished run:
                                  # the schedules keep the horizons pinned at the start (loss.total_steps,
                                  # optim.decay_steps) unless those are set explicitly.
  training.batch_size = 64        # Global batch; must divide by the number of devices (and of processes).
  training.ema_rates = (0.999,)   # Sampling EMAs of the parameters; the first is what sampling uses by default.
  # How the sampling EMAs start, k the 0-based step: 'capped': decay min(rate, (1 + k)/(10 + k)), so short runs are
  # not dominated by the init; the cap is below 0.999 until k ~ 9000 and below 0.9999 until k ~ 90000, so in a
  # shorter run every rate above it averages alike (a horizon of ~k/9 steps). 'debias': the exact exponential
  # average of the iterates, weights rate^(k - j) normalised to sum to 1 (Adam's bias correction): a horizon of
  # 1/(1 - rate) steps from the start, no weight on the init. 'none': decay = rate from step 0.
  training.ema_warmup = 'capped'
  training.log_every = 50         # Steps between metric logs (averages over the interval).
  training.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
  training.keep_checkpoints = 3   # Keep the latest this many checkpoints ...
  training.keep_every = 0         # ... plus every checkpoint whose step is a multiple of this (0: none).
  # Divergence guard: the run stops, before saving that state, as soon as an update leaves any weight of the
  # parameters, the target network or an EMA above this in absolute value (or not finite), and a resumed
  # checkpoint must pass the same bound. A too-high learning rate can blow the weights up while the loss still
  # reads finite (lr = 1e6: max |w| 6.6e6 after one update, 1.2e14 after two, NaN after three); a checkpoint of
  # such a state gives a NaN loss on resume whatever the new learning rate, so it must never be the one to
  # resume from. Healthy runs stay far below: max |w| is 1.0 at initialisation in every config (GroupNorm
  # scales), 1.9 after the 7800 steps of configs/fashion_mnist_ct.py, and 6.5 after 300 steps of
  # configs/test.py at lr = 0.1 (Adam), a rate 100x too high. 0 (or None) turns the bound off; non-finite
  # weights still stop the run.
  training.max_param_abs = 1e4
  training.eval_every = 1000      # Steps between sample grids (one-step and two-step) under WORKDIR/samples.
  training.num_eval_samples = 64  # Images per grid (a square number keeps the grid square).
  # 'float32' | 'bfloat16': activations and matmuls of the network in bf16, while parameters, optimizer
  # state, EMAs, the preconditioning and the loss stay float32 (a gain on TPUs and recent GPUs only).
  training.precision = 'float32'
  training.disable_most_optimizations = False  # XLA jax_disable_most_optimizations: faster compile, slower steps.
  # How the train state lies on the ('data',) mesh of all devices: 'replicated' (plain data parallel) or 'fsdp'
  # (parameters, EMAs and optimizer state sharded over the devices and gathered per layer as needed, for models
  # that do not fit replicated). Arrays under fsdp_min_size elements stay replicated. Batches are always split.
  training.sharding = 'replicated'
  training.fsdp_min_size = 2 ** 14

  # ---------------------------------------------------------------------------------------------
  # sampling: defaults for eval grids, the sample CLI and the notebook API.
  # ---------------------------------------------------------------------------------------------
  sampling = config.sampling = ml_collections.ConfigDict()
  sampling.two_step_t = 2.52      # Intermediate time of two-step sampling (grids and `--steps=2` default): a noise
                                  # level sigma; for 'meanflow' a flow time in (0, 1) (its configs set 0.5).
  # Time of consistency sampling's first network call, x = start_t z, f(x, start_t) (None: consistency.sigma_max,
  # CM Algorithm 1). A lower start treats start_t z as data + start_t z: the data's std (0.5-0.7) is small
  # against it, and iCT's lognormal noise density is ~2.5x higher at 40 than at 80. Not for EDM models.
  sampling.start_t = ml_collections.config_dict.placeholder(float)
  sampling.clip = True            # Consistency sampling: clip each denoised x0 to [-1, 1] between steps (as the
                                  # official code). EDM sampling: clip only the final image.
  # Models trained with loss.name = 'edm' are sampled with the EDM ODE sampler instead:
  sampling.diffusion_solver = 'heun'  # 'heun' (EDM Algorithm 1, 2 steps - 1 network calls) | 'euler'.
  sampling.diffusion_steps = 18   # Karras-grid steps (EDM: 18, i.e. 35 network calls with Heun).

  # ---------------------------------------------------------------------------------------------
  # evaluation: sample-quality metrics (cm_jax/evaluation/; in training every `every` steps).
  # ---------------------------------------------------------------------------------------------
  evaluation = config.evaluation = ml_collections.ConfigDict()
  evaluation.every = 0            # Steps between in-training evaluations (0: none). Each samples num_samples
                                  # images per grid sampler (one and two steps; Heun and Euler for EDM) and
                                  # writes eval/<sampler>/<metric> scalars (TensorBoard and console).
  evaluation.num_samples = 1000   # Samples per in-training evaluation (the evaluate CLI takes --num).
  evaluation.seed = 12345         # Sampling seed of in-training evaluations: the same noise at every step.
  # Feature network: 'auto' ('classifier' for the MNIST family, 'inception' for every RGB dataset) |
  # 'classifier' (a small CNN cm_jax trains on the train split, cached; scores NOT comparable to Inception
  # FIDs) | 'inception' (the 2015-12-05 Inception graph of published FIDs; needs inception_path or a download).
  evaluation.feature_net = 'auto'
  evaluation.inception_path = ml_collections.config_dict.placeholder(str)  # classify_image_graph_def.pb or
                                  # inception-2015-12-05.tgz; None: CACHE_DIR/inception/, else download.
  evaluation.cache_dir = ml_collections.config_dict.placeholder(str)  # None: $CM_JAX_CACHE or ~/.cache/cm_jax.
  evaluation.reference_split = 'auto'  # Split whose features are the reference statistics (cached): 'train',
                                  # 'test', or 'auto' (test; train for an image folder, which has no other).
  evaluation.num_reference = 0    # Reference images, spread evenly over the split; 0: the whole split.
  evaluation.batch_size = 500     # Images per feature-network call, and per sampling call of in-training
                                  # evaluations (lower it if sampling runs out of memory).
  evaluation.pr_k = 3             # k of the k-NN balls of improved precision/recall (ADM evaluator: 3).
  evaluation.classifier_steps = 2000       # Training of the 'classifier' feature network (Adam, cosine lr).
  evaluation.classifier_batch_size = 128
  evaluation.classifier_lr = 1e-3
  evaluation.classifier_seed = 0
  return config
