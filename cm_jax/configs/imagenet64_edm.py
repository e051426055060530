"""Class-conditional EDM teacher on ImageNet 64x64: the teacher of configs/imagenet64_cd.py.

    python -m cm_jax.train --config=configs/imagenet64_edm.py --workdir=TEACHER \
        --config.data.manual_dir=IMAGENET/train

Network: 295,899,363 parameters (benchmarks/param_counts.py, jax.eval_shape), the ADM ImageNet-64 UNet of
CM's launch lines (openai/consistency_models scripts/launch.sh): ch 192, ch_mult (1, 2, 3, 4), 3 residual
blocks per level, attention at 32, 16 and 8 with 64-channel heads, scale-shift GroupNorm (32 groups),
residual down/upsampling, a learned embedding of the 1000 classes added to the time embedding. EDM's paper
gives ~296M for this network as we read it (with ADM's 6 output channels; cm_jax outputs 3). Fourier embedding
at 0.02 where ADM uses positional features: cm_jax's choice, as for CIFAR-10.
Recipe (CM's `edm_train.py` launch line): EDM loss (lognormal sigma, Karras weighting), Adam lr 1e-4, dropout
0.1, global batch 4096, sampling EMAs 0.9999432 / 0.9999 / 0.999, mixed precision (fp16 there; bfloat16 here);
EDM Heun with 40 steps (79 network calls) as CM's sampling line. The launch line gives no length; 600k steps is
cm_jax's choice near EDM's own ImageNet-64 run (2500M images, ~610k steps at batch 4096, as we read EDM's
README). Random flips: cm_jax's choice (we did not verify what ADM's loader does for this run).
Data: the ImageNet train folder (data.name 'image_folder', data.manual_dir = IMAGENET/train with its 1000
synset folders; labels in sorted synset order, ADM's order), each image centre-cropped and resized to 64x64 as
ADM/EDM/CM prepare ImageNet 64x64, read from disk per step (data.storage 'stream'; 1.28M JPEGs, ~16 GB if
decoded). `--config.data.name=imagenet64` trains on TFDS imagenet_resized/64x64 instead: the Chrabaszcz et al.
(2017) downsampled ImageNet (whole images box-resized, no crop, labels in another order), whose FIDs are NOT
comparable with the papers'.
Evaluation: Inception FID of 50,000 samples against 50,000 training images spread evenly over the folder
(reference_split 'train', num_reference 50,000); not run during training: use cm_jax.evaluate.
Hardware assumed: 64x A100 80GB or a TPU v4-64 slice (not measured).
"""

from cm_jax.configs import common
from cm_jax.configs import default


def get_config():
  config = default.get_config()
  common.apply_edm(config, diffusion_steps=40)  # EDM loss and Adam; Heun sampling, 40 steps (CM's sampling line).
  config.data.name = 'image_folder'       # --config.data.manual_dir=IMAGENET/train (1000 synset folders).
  config.data.image_size = 64             # Centre crop + resize, as ADM/EDM/CM's ImageNet 64x64.
  config.data.storage = 'stream'
  config.data.random_flip = True

  common.apply_adm_unet(config, ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8))
  config.model.dropout = 0.1
  config.model.class_conditional = True
  config.model.num_classes = 1000

  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0

  training = config.training
  training.batch_size = 4096
  training.num_steps = 600_000
  training.ema_rates = (0.9999432189950708, 0.9999, 0.999)
  training.precision = 'bfloat16'
  training.log_every = 100
  training.checkpoint_every = 5_000
  training.keep_every = 50_000
  training.eval_every = 5_000

  evaluation = config.evaluation
  evaluation.feature_net = 'inception'
  evaluation.reference_split = 'train'
  evaluation.num_reference = 50_000
  evaluation.every = 0
  return config
