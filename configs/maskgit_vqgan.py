"""MaskGIT VQGAN tokenizer (RAR's tokenizer) at the paper size: 256px, f16, 1024 codes.

Loads the official checkpoint via ``genvis_jax.convert`` (``--config.init_from``)
or trains from scratch with taming-style losses: L1 + LPIPS + VQ + PatchGAN hinge.
No official training recipe is published for this tokenizer (MaskGIT releases
inference code, 1d-tokenizer the converted weights), so the losses and numbers
below are our choices: a tokenizer trained with them is not RAR's.

  python -m genvis_jax.main --config=configs/maskgit_vqgan.py --workdir=DIR \
      --config.data.path=TFDS_DIR --config.loss.lpips_path=vgg_lpips.npz

``:runlocal`` keeps this recipe (losses, adaptive GAN weight, EMA, optimizers)
and shrinks the model (32 px -> 8x8 codes of 256), steps and batch, on the
embedded demo data: ``--config=configs/maskgit_vqgan.py:runlocal``.
"""

import ml_collections

from configs import base


def runlocal_model(m):
  """The paper model shrunk for a laptop: 32 px -> 8x8 codes, 256 codes
  (``m`` may be locked: code_dim, at its default in the paper config, is
  added)."""
  with m.unlocked():
    m.update(dict(image_size=32, hidden_channels=32, channel_mult=(1, 2, 2),
                  num_res_blocks=1, z_channels=32, code_dim=32, num_codes=256))
  return m


def get_config(arg=None):
  arg = base.parse_arg(arg, runlocal=False)
  config = base.get_config()
  config.task = "tokenizer"

  m = config.model
  m.name = "maskgit_vqgan"
  m.image_size = 256
  m.hidden_channels = 128
  m.channel_mult = (1, 1, 2, 2, 4)
  m.num_res_blocks = 2
  m.z_channels = 256
  m.num_codes = 1024           # code_dim follows z_channels (no quant_conv)

  d = config.data
  d.source = "tfds"
  d.name = "imagenet2012"
  d.image_size = 256
  config.evaluate.kind = "tokenizer"   # mode=evaluate: PSNR, SSIM, usage, rFID

  # Generator-side loss weights (read by the tokenizer task).
  lo = config.loss = ml_collections.ConfigDict()
  lo.reconstruction = "l1"       # l1 | l2
  lo.reconstruction_weight = 1.0
  lo.perceptual_weight = 1.0     # LPIPS (VGG16); 0 disables it
  lo.lpips_path = ""             # local .npz, see genvis_jax/models/lpips.py
  lo.quantizer_weight = 1.0      # times aux["quantizer_loss"]
  lo.gan = "hinge"               # hinge | non_saturating
  lo.gan_weight = 0.1            # generator adversarial weight after disc_start
  lo.adaptive_gan_weight = True  # taming: scale by |grad rec| / |grad gan| at the last layer
  lo.disc_start = 20_000         # steps before the GAN terms switch on

  # PatchGAN discriminator and its own optimizer.
  dc = config.disc = ml_collections.ConfigDict()
  dc.name = "patchgan"
  dc.image_size = 256
  dc.ndf = 64
  dc.n_layers = 3
  dc.norm = "group"              # group | none (no BatchNorm: pure-functional)
  dc.dtype = "float32"
  dc.param_dtype = "float32"
  dc.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
      schedule="constant", warmup_steps=0, end_lr=0.0,
      no_decay=("bias", "scale", "embedding")))

  # Adam (no weight decay) with taming/MaskGIT GAN betas.
  o = config.optimizer
  o.name = "adamw"
  o.lr = 1e-4
  o.b1 = 0.5
  o.b2 = 0.9
  o.weight_decay = 0.0
  o.schedule = "constant"
  o.warmup_steps = 5_000

  t = config.train
  t.global_batch_size = 256
  t.num_steps = 500_000
  t.ema_decay = 0.999
  t.grad_clip = 1.0
  if arg.runlocal:
    runlocal_model(m)
    base.runlocal_data(d)
    dc.image_size, dc.ndf, dc.n_layers = 32, 16, 2
    base.runlocal_train(t, steps=20, batch=8)
    # The GAN (adaptive weight) runs from half way (step 10 of 20).
    lo.disc_start = base.steps_fraction(t, 1, 2)
    o.warmup_steps = base.steps_fraction(t, 1, 4)
    config.evaluate.num_images = 64
    config.evaluate.batch_size = 16
  return base.finish(config)
