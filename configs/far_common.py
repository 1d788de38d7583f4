"""Shared FAR settings (official ``far_dual.py`` / ``train_far_dual.sh``).

``configs/far_{b,l}.py`` pick a size; the config argument picks the tokenizer
variant: ``--config=configs/far_b.py:dual`` (default) or ``:triple``, and
``runlocal`` (``far_b.py:dual,runlocal``) keeps the recipe (task, dropouts,
CFG sampling, ten-crop pre-tokenization with the FQGAN tokenizer, ADM
evaluation) while shrinking the model, tokenizer
(``fqgan_{dual,triple}_ds16.py:runlocal``), steps, batch and data (the embedded
demo shapes) for a laptop CPU.

``batch=N`` (``far_b.py:dual,batch=512``) sets the global batch; the step
count follows it (300 epochs), the learning rate stays 1e-4 as in the official
script. With ``runlocal`` it replaces runlocal's batch of 16. Overriding
``--config.train.global_batch_size`` alone keeps the batch-256 step count
(1,501,200 steps: 600 epochs at batch 512); the trainer's first log line
says how many epochs a run's steps are.

``config.tokenizer`` is the FQGAN tokenizer that pre-tokenizes (``mode=
pretokenize``) and decodes samples: ``--config.tokenizer.checkpoint=DIR``.
"""


from configs import base
from configs import fqgan_common

# backbone layers, head layers, width, heads.
SIZES = {
    "b": dict(n_layer=24, n_head_layer=3, dim=1024, n_head=16),
    "l": dict(n_layer=36, n_head_layer=4, dim=1280, n_head=20),
}
# sub-codebooks (order vis, sem[_mid, sem_high]) and the paper's CFG scale.
VARIANTS = {
    "dual": dict(num_codebooks=2, guidance_scale=2.0, tokenizer="fqgan_dual_ds16"),
    "triple": dict(num_codebooks=3, guidance_scale=1.75,
                   tokenizer="fqgan_triple_ds16"),
}

# LlamaGen/FQGAN ``creat_optimizer``: every >= 2-D tensor (matmul kernels and
# the embedding tables) is decayed; 1-D ones (biases, RMSNorm scales) are not.
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$")


def get_config(size: str = "b", arg: str | None = "dual"):
  arg = base.parse_arg(arg, positional=("variant",), variant="dual",
                       runlocal=False, batch=256)
  size, variant = (size or "b").lower(), arg.variant.lower()
  if size not in SIZES:
    raise ValueError(f"Unknown FAR size {size!r}; choose one of {sorted(SIZES)}.")
  if variant not in VARIANTS:
    raise ValueError(f"Unknown FAR variant {variant!r}; use e.g. "
                     f"--config=configs/far_{size}.py:dual (one of {sorted(VARIANTS)}).")
  s, v = SIZES[size], VARIANTS[variant]
  c = base.get_config()
  c.task = "far"

  m = c.model
  m.name = "far"
  m.num_codebooks = v["num_codebooks"]
  m.codebook_size = 16384
  m.num_classes = 1000
  m.grid = 16                 # 256 px / ds16
  m.dim = s["dim"]
  m.n_layer = s["n_layer"]
  m.n_head = s["n_head"]
  m.n_head_layer = s["n_head_layer"]
  # SwiGLU width: LlamaGen's rule find_multiple(int(8 dim / 3), multiple_of=256)
  # unless ffn_dim is set (see genvis_jax.models.far.build).
  m.dtype = "bfloat16"        # official trains with bf16 autocast

  c.data.source = "tokens"    # pre-tokenized (class, (k, 256) FQGAN codes)
  c.data.path = ""            # token files glob; set on the command line
  c.data.num_classes = 1000
  c.data.random_flip = False  # flips are baked into the ten-crop tokens
  # Official CustomDataset*: 1,281,167 images an epoch, each with one of its
  # ten crops drawn at random.
  c.data.crops_per_epoch = "one"

  c.train.global_batch_size = arg.batch
  c.train.num_steps = 300 * base.steps_per_epoch(arg.batch)   # 300 epochs
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.0
  c.train.checkpoint_every = 5000

  o = c.optimizer
  o.name = "adamw"
  o.lr = 1e-4                 # train_far_dual.sh (paper: 2e-4)
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.05
  o.schedule = "constant"
  o.warmup_steps = 0
  o.no_decay = NO_DECAY

  # The official sampler casts the whole model to bf16 (--precision bf16,
  # logits and CFG included); here fp32, as inference producing numbers.
  # Official sample_c2i_ddp_*: torch.randint(0, 1000, (n,)), labels drawn
  # i.i.d. uniform (RAR and Equivariant sample 50 per class: "balanced").
  base.add_sample(c, batch_size=256, labels="uniform",
                  guidance_scale=v["guidance_scale"],   # every sub-token
                  temperature=1.0, top_k=0, top_p=1.0)

  # The FQGAN tokenizer (official fqgan_{dual,triple}_ds16.pt, converted): codes
  # from ten-crop + flip of a 1.1x centre crop, as LlamaGen extract_codes_c2i.py.
  ds, tok_arg = 16, "runlocal" if arg.runlocal else None
  tok = fqgan_common.fqgan_config(variant, ds, tok_arg)
  base.add_tokenizer(c, tok.model, config_file=(
      f"configs/fqgan_{variant}_ds{ds}.py{':' + tok_arg if tok_arg else ''}"))
  c.pretokenize = tok.pretokenize
  if arg.runlocal:
    # A batch=N given with runlocal is kept.
    runlocal(c, arg.batch if "batch" in arg.given else 16)
  return c


def runlocal_model(m, codebook_size: int):
  """The paper model shrunk for a laptop: the 8x8 code grid of 32 px images
  (/4), width 64, 2 backbone + 1 head layer, the demo shapes' 10 classes."""
  m.update(dict(codebook_size=codebook_size, num_classes=10, grid=8, dim=64,
                n_layer=2, n_head=4, n_head_layer=1, multiple_of=64))
  return m


def runlocal(c, batch: int = 16):
  """Shrinks sizes, steps, batch and data only (see the module docstring)."""
  runlocal_model(c.model, c.tokenizer.model.num_codes)
  c.data.num_classes = 10
  c.data.image_size = c.tokenizer.model.image_size   # as for RAR's runlocal
  base.runlocal_train(c.train, steps=20, batch=batch)
  c.sample.num_samples = 16
  c.sample.batch_size = 8
  c.evaluate.batch_size = 8
  return c
