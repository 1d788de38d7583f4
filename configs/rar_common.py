"""Shared RAR settings (paper / official ``rar.yaml``); rar_{b,l,xl,xxl}.py pick a size.

``--config=configs/rar_b.py:runlocal`` keeps the recipe (task, bf16 compute,
schedules scaled to the step count, label dropout, order annealing, ten-crop
pre-tokenization, per-size CFG sampling, ADM evaluation) and shrinks the
model, tokenizer (``configs/maskgit_vqgan.py:runlocal``), steps, batch and data
(the embedded demo shapes) so every mode runs on a laptop CPU in about a minute.
"""


from configs import base
from configs import maskgit_vqgan

# depth, width, mlp width (all 16 heads), and per-size CFG sampling settings.
SIZES = {
    "b": dict(depth=24, hidden_size=768, mlp_dim=3072,
              guidance_scale=16.0, guidance_pow=2.75, temperature=1.0),
    "l": dict(depth=24, hidden_size=1024, mlp_dim=4096,
              guidance_scale=15.5, guidance_pow=2.5, temperature=1.02),
    "xl": dict(depth=32, hidden_size=1280, mlp_dim=5120,
               guidance_scale=6.9, guidance_pow=1.5, temperature=1.02),
    "xxl": dict(depth=40, hidden_size=1408, mlp_dim=6144,
                guidance_scale=8.0, guidance_pow=1.2, temperature=1.02),
}

# Parameter-path regexes (matched with re.search on '/'-joined paths) without
# weight decay: biases, every norm, the embedding tables, the positional and
# step tables, the whole head adaLN. Block adaLN kernels, cls_token and lm_head
# kernel keep decay (as in the official optimizer grouping).
NO_DECAY = (
    r"(^|/)bias$",
    r"norm",
    r"(^|/)embeddings/",
    r"(^|/)pos_embed$",
    r"(^|/)target_aware_pos_embed$",
    r"(^|/)timesteps_embeddings$",
    r"(^|/)adaln_before_head/",
)


def get_config(size: str = "b", arg=None):
  arg = base.parse_arg(arg, runlocal=False)
  size = (size or "b").lower()
  if size not in SIZES:
    raise ValueError(f"Unknown RAR size {size!r}; choose one of {sorted(SIZES)}.")
  s = SIZES[size]
  c = base.get_config()
  c.task = "rar"

  m = c.model
  m.name = "rar"
  m.hidden_size = s["hidden_size"]
  m.depth = s["depth"]
  m.num_heads = 16
  m.mlp_dim = s["mlp_dim"]
  m.num_classes = 1000
  m.seq_len = 256               # 16 x 16 tokens
  m.max_pos = 256 + 1024        # official table sizes (only 258 rows used)
  m.num_timesteps = 256 + 100
  m.dtype = "bfloat16"          # official trains in bf16 mixed precision

  c.data.source = "tokens"      # pre-tokenized (class, 256 MaskGIT-VQ codes)
  c.data.path = ""              # token files glob; set on the command line
  c.data.num_classes = 1000
  c.data.random_flip = False    # flips are baked into the ten-crop tokens

  c.train.global_batch_size = 2048
  c.train.num_steps = 250_000
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.0
  c.train.label_dropout = 0.1            # class label -> null class
  c.train.randomness_anneal_start = 125_000   # epoch 200
  c.train.randomness_anneal_end = 187_500     # epoch 300
  c.train.checkpoint_every = 5000

  o = c.optimizer
  o.name = "adamw"
  o.lr = 4e-4
  o.b1 = 0.9
  o.b2 = 0.96
  o.weight_decay = 0.03
  o.schedule = "cosine"
  o.warmup_steps = 62_500
  o.end_lr = 1e-5
  o.no_decay = NO_DECAY

  # The official sampler runs in fp32 (TF32 matmuls, no autocast), 50 images
  # per class. 256 splits over any power-of-two device count up to 256 (250
  # stopped an 8-GPU or TPU-slice run at start); the last batch is padded.
  base.add_sample(c, batch_size=256, guidance_scale=s["guidance_scale"],
                  guidance_pow=s["guidance_pow"], temperature=s["temperature"])

  # MaskGIT VQGAN: what pretokenize encodes with and samples decode with
  # (--config.tokenizer.checkpoint=DIR from `python -m genvis_jax.convert`).
  base.add_tokenizer(c, maskgit_vqgan.get_config().model,
                    config_file="configs/maskgit_vqgan.py")
  m.codebook_size = c.tokenizer.model.num_codes   # its 1024 codes
  images = base.get_config().data
  images.source, images.name, images.image_size = "tfds", "imagenet2012", 256
  images.random_crop = images.random_flip = False
  base.add_pretokenize(c, images, ten_crop=True)
  if arg.runlocal:
    runlocal(c)
  return c


def runlocal(c):
  """Shrinks sizes, steps, batch and data only (see the module docstring)."""
  m = c.model
  c.tokenizer.model = maskgit_vqgan.get_config("runlocal").model
  m.update(dict(hidden_size=64, depth=2, num_heads=4, mlp_dim=256,
                codebook_size=c.tokenizer.model.num_codes, num_classes=10,
                seq_len=64, max_pos=64 + 2, num_timesteps=64 + 2))
  c.tokenizer.config_file = "configs/maskgit_vqgan.py:runlocal"
  c.data.num_classes = 10
  c.data.image_size = 32   # the images behind the tokens (a reference of them)
  t = base.runlocal_train(c.train, steps=20, batch=16)
  # The paper's schedule points as fractions of its 250k steps.
  t.randomness_anneal_start = base.steps_fraction(t, 1, 2)
  t.randomness_anneal_end = base.steps_fraction(t, 3, 4)
  c.optimizer.warmup_steps = base.steps_fraction(t, 1, 4)
  base.runlocal_data(c.pretokenize.data, num_examples=32)
  c.pretokenize.data.random_crop = c.pretokenize.data.random_flip = False
  c.pretokenize.batch_size = 16
  c.sample.num_samples = 16
  c.sample.batch_size = 8
  c.evaluate.batch_size = 8
  return c
