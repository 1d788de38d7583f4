"""Equivariant column tokenizer at the paper size (official first-stage config).

256-px-high images in [-1, 1] -> one 256-d token per 16-px column. Encoder
86.1M, decoder 121.5M, quant / post-quant 3.1M each parameters (+ the 46.4M
semantic decoder). Losses: L1 + LPIPS over a logvar, KL 0.01, hinge GAN with the
frozen DINO ViT-S/16 discriminator (adaptive weight x 0.5 from step 5001),
semantic alignment to DINOv2-B/14 patch tokens (x 5.0 from step 20001).
fp32, matmuls and convolutions too (``config.matmul_precision``), as the
official trains.
Stage 2 (``--config=configs/eq_tokenizer.py:stage2 --config.init_from=STAGE1``,
the official ``tokenizer_config_stage2.yaml``) trains the decoder, post-quant
layer and semantic decoder only, with the semantic loss off. As the
official ``ckpt_path`` (the whole state dict), ``init_from`` loads stage 1's
EMA weights and its discriminator (``init_groups``); the optimizers start
afresh. ``init_from`` must then be the stage-1 training run (or one of its
``checkpoints/<step>``); ``--config.init_groups='()'`` starts the
discriminator afresh, e.g. from converted weights.

  python -m genvis_jax.main --config=configs/eq_tokenizer.py --workdir=DIR \\
      --config.data.path=TFDS_DIR --config.loss.lpips_path=vgg_lpips.npz \\
      --config.disc.vit_path=dino_deitsmall16_pretrain.pth \\
      --config.loss.teacher_path=dinov2_vitb14_flax.npz

Weights files are local, nothing downloads: the DINO ViT-S/16 state dict as
``.pth`` / ``.safetensors`` / ``.npz`` (``genvis_jax.convert.dino_vit.load_dino_vit``)
and DINOv2-B/14 converted with ``python -m genvis_jax.convert --kind=dinov2``. An empty ``disc.vit_path`` falls back to a randomly
initialised frozen ViT (logged); an empty ``teacher_path`` turns the semantic
loss off.

``--config=configs/eq_tokenizer.py:runlocal`` keeps this recipe (L1 + KL, the
frozen-ViT DINO discriminator with its adaptive weight, step-decay schedule,
EMA) and shrinks the model (32 px high -> one 16-d token per 16-px column), the
discriminator ViT, steps, batch and data (the embedded 32x64 demo landscapes).
"""

import ml_collections

from configs import base


def tokenizer_model(**overrides) -> ml_collections.ConfigDict:
  """``config.model`` of the paper tokenizer (official ddconfig names)."""
  return base.model_config("eq_tokenizer", **{
      **dict(resolution=256, embed_dim=256, semantic=True), **overrides})


def dino_disc(**overrides) -> ml_collections.ConfigDict:
  """Frozen DINO ViT-S/16 features + trainable heads (official ``DinoDisc``)."""
  d = ml_collections.ConfigDict(dict(
      name="dino_disc", vit_path="", img_size=224, patch_size=16, dim=384,
      depth=12, num_heads=6, key_depths=(2, 5, 8, 11), head_kernel=9,
      # BatchNormLocal statistics per GPU batch (official: 12 = 192 / 16 GPUs,
      # 2 groups of 6); a smaller call (runlocal, init) is one replica.
      replica_batch=12,
      diffaug=True, diffaug_cutout=0.2, image_size=256))
  d.update(overrides)
  return d


def runlocal_model(**overrides) -> ml_collections.ConfigDict:
  """The paper tokenizer shrunk for a laptop: 32 x 64 images -> 4 columns."""
  return tokenizer_model(
      ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(2,),
      resolution=32, image_width=64, z_channels=16, embed_dim=16,
      semantic=False, **overrides)


def runlocal(c):
  """Shrinks sizes, steps, batch and data only (see the module docstring)."""
  c.model = runlocal_model()
  base.runlocal_data(c.data, source="demo_landscapes", num_classes=5)
  c.data.image_width = 64
  c.disc.update(dict(img_size=32, patch_size=8, dim=32, depth=4, num_heads=2,
                     key_depths=(0, 1, 2, 3), head_kernel=3, image_size=32))
  t = base.runlocal_train(c.train, steps=20, batch=8)
  c.loss.disc_start = base.steps_fraction(t, 1, 2)
  c.loss.semantic_start = base.steps_fraction(t, 1, 2)
  c.optimizer.warmup_steps = base.steps_fraction(t, 1, 4)
  c.optimizer.decay_every = base.steps_fraction(t, 3, 4)
  c.evaluate.num_images = 32
  c.evaluate.batch_size = 8
  return c


def get_config(arg=None):
  arg = base.parse_arg(arg, runlocal=False, stage2=False)
  c = base.get_config()
  c.task = "eq_tokenizer"
  c.model = tokenizer_model()
  # The official trains in fp32 (Lightning's default precision 32): PyTorch
  # keeps TF32 off for its matmuls (its convolutions take TF32). XLA's
  # default, one bf16 pass on a TPU, is 8x TF32's error on a 3x3 conv;
  # "tensorfloat32" (3 bf16 passes on a TPU, TF32 on GPUs) trades a little
  # of full fp32's exactness for speed, as the generators' configs say.
  c.matmul_precision = "float32"

  d = c.data
  d.source = "tfds"
  d.name = "imagenet2012"
  d.image_size = 256
  # The official ImagePaths transform (tokenizer/data/base.py): albumentations
  # SmallestMaxSize (OpenCV bilinear) + RandomCrop and flips for training,
  # + CenterCrop for validation.
  d.random_crop_method = "albumentations"
  d.center_crop = "albumentations"
  d.to_float = "taming"   # its (x / 127.5 - 1) in float64, not ToTensor's

  lo = c.loss = ml_collections.ConfigDict()
  # The L1 term has weight 1: the official loss stores a pixelloss_weight
  # but never reads it, so there is no setting for it here.
  lo.perceptual_weight = 1.0       # LPIPS (VGG16), needs lpips_path
  lo.lpips_path = ""
  lo.logvar_init = 0.0
  lo.learn_logvar = False          # the official optimizers never update it
  lo.kl_weight = 0.01
  lo.gan = "hinge"
  lo.disc_start = 5001
  lo.disc_weight = 0.5             # times the adaptive weight
  lo.semantic_weight = 5.0
  lo.semantic_start = 20001
  lo.teacher_path = ""             # DINOv2 ViT-B/14 .npz; "" = no semantic loss
  # genvis_jax.models.dinov2 tower ("vit_b14", or a teacher registry name as
  # FQGAN's config.teachers[i].name: "dinov2:vit_b14"); input 224 *
  # resolution // 256 px (16 x 16 patch tokens of width 768 = the semantic
  # decoder output).
  lo.teacher = ml_collections.ConfigDict(dict(name="vit_b14", img_size=224))
  lo.stage2 = False                # fine-tune decoder + post-quant only

  c.disc = dino_disc()
  c.disc.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1.92e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
      schedule="constant", warmup_steps=0, end_lr=0.0, no_decay=("bias",)))

  o = c.optimizer
  o.name = "adam"
  o.lr = 1.92e-4
  o.b1 = 0.5
  o.b2 = 0.9
  o.weight_decay = 0.0
  o.schedule = "step_decay"        # official LambdaWarmUpDecayScheduler
  o.warmup_steps = 3000
  o.decay_every = 30_000
  o.decay_rate = 0.2

  t = c.train
  t.global_batch_size = 192
  t.num_steps = 320_000
  t.ema_decay = 0.99               # official code default (paper: 0.9999)
  t.ema_warmup = True              # official LitEma(use_num_upates=True)
  t.grad_clip = 0.0
  t.image_every = 5000
  c.evaluate.kind = "tokenizer"   # mode=evaluate: PSNR, SSIM, rFID
  if arg.stage2:                   # official tokenizer_config_stage2.yaml
    lo.stage2 = True
    lo.semantic_weight = 0.0
    c.init_groups = ("disc",)      # stage 1's discriminator goes on training
    # LitEma's num_updates is loaded with stage 1's state dict: its decay
    # is 0.99 from stage 2's first step, with no warm-up.
    t.ema_warmup = False
  if arg.runlocal:
    runlocal(c)
  return base.finish(c)
