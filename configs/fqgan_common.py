"""Shared LlamaGen VQ / FQGAN tokenizer settings (official FQGAN training recipe).

specs/fqgan.md: ImageNet 256, random crop 80-100% + flip, pixels in [-1, 1];
batch 256; Adam lr 2e-4 constant, betas (0.9, 0.95), no weight decay; clip 1.0
(both optimizers); pixel L2 x1 + LPIPS x1 + VQ; hinge PatchGAN, weight 0.5 from
step 20k, no adaptive weight (the official D loss is scaled by 0.5 as well:
``loss.disc_loss_weight``); 40 epochs = 40 * 5004 steps; no EMA; bf16. The
steps are batch 256's: ``--config.train.global_batch_size`` alone changes
the epochs (the trainer's first log line says how many).

``get_config`` argument (``--config=configs/X.py:ARG``, comma-separated):
"bf16" (default, the official mixed precision) or "fp32" (e.g. to compare with
the official checkpoints), "runlocal": the same recipe (losses, GAN from a
few steps in, optimizers) with the model, steps, batch and data (the embedded
demo shapes, 32 px -> 8x8 codes) shrunk for a laptop, and for the
single-codebook VQ "llamagen": LlamaGen's own launch instead of FQGAN's
(lr 1e-4, batch 128, 40 x 10,009 steps). The tokenizer configs
pick the model in vq_ds{16,8}.py and fqgan_{dual,triple}_ds{16,8}.py.

Every tokenizer config also pre-tokenizes with itself (``mode=pretokenize``,
``--config.tokenizer.checkpoint=DIR``): ten-crop codes for FAR.
"""

import ml_collections

from configs import base

CHANNEL_MULT = {16: (1, 1, 2, 2, 4), 8: (1, 2, 2, 4)}
STEPS_PER_EPOCH = 5004  # 1,281,167 ImageNet images // 256, drop_last
PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}


def parse_arg(arg):
  """"bf16" | "fp32", optionally with "runlocal" and (the single-codebook
  VQ) "llamagen" (e.g. ``fp32,runlocal``)."""
  a = base.parse_arg(arg, positional=("precision",), precision="bf16",
                     runlocal=False, llamagen=False)
  a.precision = a.precision.lower()
  if a.precision not in PRECISIONS:
    raise ValueError(
        f"Unknown config argument {a.precision!r}; this config takes a "
        f"precision ({' or '.join(sorted(PRECISIONS))}) and the flags "
        "runlocal and (vq_ds16 / vq_ds8) llamagen, comma-separated (e.g. "
        "--config=configs/X.py:fp32,runlocal).")
  return a


def _adam(lr):
  return ml_collections.ConfigDict(dict(
      name="adam", lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      schedule="constant", warmup_steps=0, end_lr=0.0,
      no_decay=("bias", "scale", "embedding")))


def cnn_model(name: str, ds: int) -> ml_collections.ConfigDict:
  """LlamaGen CNN + one 16384 x 8 L2 codebook (the k = 1 case)."""
  if ds not in CHANNEL_MULT:
    raise ValueError(f"Downsampling factor must be one of {sorted(CHANNEL_MULT)}, "
                     f"got {ds}.")
  return base.model_config(name, image_size=256, channel_mult=CHANNEL_MULT[ds],
                           num_codes=16384, code_dim=8)


def runlocal_model(m):
  """The paper model shrunk for a laptop: 32 px -> 8x8 grid (/4), 256 x 8
  codebooks, one-layer adapters and feature heads of width 32."""
  m.update(dict(image_size=32, hidden_channels=32, channel_mult=(1, 1, 1),
                num_res_blocks=1, decoder_res_blocks=1, z_channels=32,
                num_codes=256))
  if "branches" in m:
    m.update(dict(adapter_layers=1, adapter_heads=4, feat_layers=1,
                  feat_num_heads=4,
                  feat_heads=tuple((name, 32) for name, _ in m.feat_heads)))
  return m


def tokenizer_config(model: ml_collections.ConfigDict, arg=None):
  """Training config around ``model`` (task fq_tokenizer, any k)."""
  arg = parse_arg(arg)
  c = base.get_config()
  c.task = "fq_tokenizer"
  c.model = model
  c.model.dtype = PRECISIONS[arg.precision]

  d = c.data
  d.source = "tfds"
  d.name = "imagenet2012"
  d.image_size = 256
  d.random_crop = True
  d.crop_min_frac = 0.8
  d.random_flip = True

  lo = c.loss = ml_collections.ConfigDict()
  lo.reconstruction = "l2"
  lo.reconstruction_weight = 1.0
  lo.perceptual_weight = 1.0
  lo.lpips_path = ""              # local .npz, see genvis_jax/models/lpips.py
  lo.quantizer_weight = 1.0
  lo.disentangle_weight = 0.1     # paper eq. 7 (0 for k = 1 anyway)
  lo.rep_weight = 0.5             # per feature head
  lo.rep_group_size = 32          # negatives per InfoNCE group (official: per GPU, 256 / 8)
  lo.gan = "hinge"
  lo.gan_weight = 0.5
  lo.adaptive_gan_weight = False
  # Official --disc-start 20000 against global_step = train_steps + 1: the GAN
  # terms are on from the 20,000th update, 0-based step 19,999 here.
  lo.disc_start = 19_999
  lo.disc_loss_weight = 0.5       # official D loss is scaled by the GAN weight

  dc = c.disc = ml_collections.ConfigDict()
  dc.name = "patchgan"
  dc.image_size = 256
  dc.ndf = 64
  dc.n_layers = 3
  dc.norm = "batch"               # official train-mode BatchNorm2d, per GPU
  dc.group_size = 32              # images per BN batch (official: 256 / 8 GPUs)
  # Follows --config.model.dtype; a derived reference ("+ ''"), so that
  # --config.disc.dtype sets the discriminator's alone (the bare reference
  # is one field shared by both sections).
  dc.dtype = c.model.get_ref("dtype") + ""
  dc.param_dtype = "float32"
  dc.optimizer = _adam(2e-4)

  c.optimizer = _adam(2e-4)
  c.teachers = ()

  t = c.train
  t.global_batch_size = 256
  t.num_steps = 40 * STEPS_PER_EPOCH
  t.ema_decay = 0.0
  t.grad_clip = 1.0
  t.checkpoint_every = 5000
  if arg.llamagen:
    # LlamaGen's own launch (train_vq.sh: vq_train.py's defaults): lr 1e-4
    # for both optimizers, batch 128, 40 epochs of 10,009 steps; the GAN
    # still from the 20,000th update (2.56M images, not 5.12M).
    if "branches" in model:
      raise ValueError(
          "The config argument llamagen is LlamaGen's recipe for its single-"
          "codebook VQ (vq_ds16 / vq_ds8); FQGAN trains with its own.")
    c.optimizer.lr = dc.optimizer.lr = 1e-4
    t.global_batch_size = 128
    t.num_steps = 40 * (1_281_167 // 128)

  c.evaluate.kind = "tokenizer"   # mode=evaluate: PSNR, SSIM, usage, rFID
  # mode=pretokenize with this tokenizer (run in float32, see base.add_tokenizer).
  base.add_tokenizer(c, c.model)
  images = ml_collections.ConfigDict(d.to_dict())
  images.random_crop = images.random_flip = False
  base.add_pretokenize(c, images, ten_crop=True)
  if arg.runlocal:
    runlocal_model(c.model)
    base.runlocal_data(d)
    base.runlocal_data(c.pretokenize.data, num_examples=32)
    c.pretokenize.batch_size = 16
    dc.image_size, dc.ndf, dc.n_layers = 32, 16, 2
    lo.rep_group_size = 0         # whole (tiny) batch as negatives
    c.model.entropy_group_size = 0   # and as one entropy group
    base.runlocal_train(t, steps=20, batch=8)
    lo.disc_start = base.steps_fraction(t, 1, 2)
    c.evaluate.num_images = 64
    c.evaluate.batch_size = 16
  return c


def fqgan_model(kind: str, ds: int) -> ml_collections.ConfigDict:
  """FQGAN-Dual (vis, sem) or -Triple (vis, sem_mid, sem_high) model config."""
  m = cnn_model("fqgan", ds)
  m.entropy_weight = 0.03
  m.entropy_group_size = 32     # official: per GPU (256 / 8), DDP-averaged
  if kind == "dual":
    m.branches = ("vis", "sem")
    m.feat_heads = (("sem", 1024),)             # CLIP ViT-L/14 width
  elif kind == "triple":
    m.branches = ("vis", "sem_mid", "sem_high")
    m.feat_heads = (("sem_mid", 384), ("sem_high", 768))  # DINOv2-S, CLIP B/16
  else:
    raise ValueError(f"Unknown FQGAN kind {kind!r}; use dual | triple.")
  return m


def _teacher(name, head):
  return ml_collections.ConfigDict(dict(name=name, path="", head=head,
                                        kwargs=ml_collections.ConfigDict()))


# Teacher names are "<module>:<variant>" of genvis_jax/models (teachers.py).
TEACHERS = {
    "dual": (("clip_vision:vit_l14", "sem"),),
    "triple": (("dinov2:vit_s14", "sem_mid"), ("clip_vision:vit_b16", "sem_high")),
}


def fqgan_config(kind: str, ds: int, arg=None):
  c = tokenizer_config(fqgan_model(kind, ds), arg)
  # Weights files are local (set --config.teachers[i].path); empty = rep loss off.
  c.teachers = tuple(_teacher(n, h) for n, h in TEACHERS[kind])
  return c
