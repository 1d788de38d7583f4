"""Shared settings of the equivariant generators; eq_{s,b,l,h}.py pick a size.

Official recipe (README / ``train_generator.py``): 16 condition tokens, window
of 4 columns (``cond_length 3``), RoPE shift augmentation 0..15, 12-block flow
head, rectified flow with 4 noise draws per token, latents = tokenizer
posterior sample x 0.05493, AdamW (0.9, 0.95) wd 0.02 (none on 1-D params and
the head), lr 1e-4 x batch / 256, 100 warm-up epochs then constant, clip 3.0,
EMA 0.9999, 1200 epochs, fp32 (matmuls too: ``config.matmul_precision``).

The batch is a config argument (``--config=configs/eq_s.py:batch=1024``): the
learning rate, step count and warm-up follow it as the official script scales
them. Overriding ``--config.train.global_batch_size`` alone keeps the batch-2048
lr (8e-4) and 750k steps (600 epochs at batch 1024). With ``runlocal`` a
given ``batch=N`` replaces runlocal's batch of 16 and scales the lr as above
(runlocal alone keeps the batch-2048 lr).

``--config=configs/eq_s.py:runlocal`` keeps the recipe (windowed causal
generator, flow head, shift augmentation, label dropout, EMA, CFG sampling)
and shrinks the model, tokenizer (``eq_tokenizer.py:runlocal``), steps, batch
and data (the embedded 32x64 demo landscapes, 4 columns); sampling at
``--config.sample.num_columns=32`` gives images 8x the training width.
"""

import ml_collections

from configs import base
from configs import eq_tokenizer

# layers / width / heads / head width; exact instantiated parameter counts
# (1000 classes): S 127,311,488; B 295,586,560; L 644,496,128; H 1,203,206,912.
SIZES = {
    "s": dict(depth=16, hidden_size=512, num_heads=8, head_width=960),
    "b": dict(depth=24, hidden_size=768, num_heads=12, head_width=1024),
    "l": dict(depth=32, hidden_size=1024, num_heads=16, head_width=1280),
    "h": dict(depth=40, hidden_size=1280, num_heads=16, head_width=1536),
}

# No weight decay on biases, norm scales (the official 1-D parameters) and the
# whole flow head.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"^diffloss/")


def generator_model(size: str = "l", **overrides) -> ml_collections.ConfigDict:
  s = SIZES[size]
  # token_dim = the tokenizer's embed_dim; seq_len: columns per training image.
  return base.model_config("eq_generator", **{
      **dict(token_dim=256, num_classes=1000, window=4, seq_len=16, **s),
      **overrides})


def get_config(size: str = "l", arg=None):
  arg = base.parse_arg(arg, runlocal=False, batch=2048)
  size = (size or "l").lower()
  if size not in SIZES:
    raise ValueError(f"Unknown equivariant generator size {size!r}; choose one "
                     f"of {sorted(SIZES)}.")
  c = base.get_config()
  c.task = "eq_generator"
  # The official trains (--float32) and samples in full fp32: PyTorch 2.2
  # keeps TF32 off for matmuls. XLA's default fp32 dot is one bf16 pass on
  # TPU (bf16 training, which the official README warns harms stability)
  # and TF32 on GPUs; "tensorfloat32" trades exactness for speed (full fp32
  # takes 6 bf16 passes on TPU, and no tensor cores on GPUs).
  c.matmul_precision = "float32"
  c.model = generator_model(size)

  d = c.data
  d.source = "tfds"
  d.name = "imagenet2012"
  d.image_size = 256
  d.random_crop = True
  d.random_crop_method = "torchvision_bilinear"   # Resize(256) + RandomCrop(256)
  d.random_flip = True

  # Frozen tokenizer: encodes the images on the fly in training (or batches
  # carry pre-computed posterior means under "latents") and decodes samples.
  base.add_tokenizer(c, eq_tokenizer.tokenizer_model(),
                     config_file="configs/eq_tokenizer.py")
  lt = c.latents = ml_collections.ConfigDict()
  lt.scale = 0.05493            # official vae_norm
  lt.posterior_noise = True     # official: vae posterior.sample() (sigma-VAE)

  f = c.flow = ml_collections.ConfigDict()
  f.diffusion_batch_mul = 4     # noise draws per token and step
  f.t_eps = 1e-5                # t ~ U(t_eps, 1)
  f.shift_num = 16              # RoPE position shift ~ randint(0, shift_num)
  # Images that share one shift: the official code draws one per forward pass
  # of each GPU (2048 / 32 GPUs = 64 images); 1 draws one per image.
  f.shift_group = 64

  batch, epochs, warmup_epochs = arg.batch, 1200, 100
  steps_per_epoch = base.steps_per_epoch(batch)
  t = c.train
  t.global_batch_size = batch
  t.num_steps = epochs * steps_per_epoch
  t.label_dropout = 0.1
  t.grad_clip = 3.0
  t.ema_decay = 0.9999
  t.checkpoint_every = 5000
  t.image_every = 5000

  o = c.optimizer
  o.name = "adamw"
  o.lr = 1e-4 * batch / 256    # official blr x effective batch / 256
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.02
  o.schedule = "constant"
  o.warmup_steps = warmup_epochs * steps_per_epoch
  o.no_decay = NO_DECAY

  base.add_sample(
      c, batch_size=64,
      guidance_scale=7.0,       # official --cfg (demo value, Places); 1.0 = no CFG
      num_steps=100,            # Euler steps of the flow head per column
      num_columns=16,           # 16 = 256 px; e.g. 128 for 8x width
      wide_columns=0,           # training grids also this wide (0 = off)
      # samples / scale -> tokenizer.decode; derived ("* 1.0"): a bare
      # reference would make --config.sample.latent_scale set the training
      # latents' scale too.
      latent_scale=lt.get_ref("scale") * 1.0)
  # The official engine_generator.py scores with torch-fidelity: FID against
  # fid_stats/adm_in256_stats.npz (mu, sigma), IS over 10 shuffled splits.
  c.evaluate.inception_score = "torch_fidelity"
  if arg.runlocal:
    # A batch=N given with runlocal is kept.
    runlocal(c, arg.batch if "batch" in arg.given else 16)
  return c


def runlocal(c, batch: int = 16):
  """Shrinks sizes, steps, batch and data only (see the module docstring)."""
  c.model.update(dict(hidden_size=64, depth=2, num_heads=4, head_width=64,
                      head_depth=2, token_dim=16, num_classes=5,
                      num_cond_tokens=4, window=2, seq_len=4))
  c.tokenizer.model = eq_tokenizer.runlocal_model()
  c.tokenizer.config_file = "configs/eq_tokenizer.py:runlocal"
  base.runlocal_data(c.data, source="demo_landscapes", num_classes=5)
  c.data.image_width = 64
  c.latents.scale = 0.2         # ~ 1 / std of a briefly trained tiny tokenizer
  c.flow.shift_num = 4
  t = base.runlocal_train(c.train, steps=20, batch=batch)
  c.optimizer.warmup_steps = base.steps_fraction(t, 1, 4)
  c.sample.num_steps = 4
  c.sample.num_columns = 4      # the training width; 32 = 8x wider
  c.sample.wide_columns = 32
  c.sample.num_samples = 16
  c.sample.batch_size = 8
  c.evaluate.batch_size = 8
  return c
