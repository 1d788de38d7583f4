"""Tiny FAR for the CPU demo: the real generator and task, shrunk.

Dual (2 sub-codebooks of 64 codes) over the 8x8 code grid of 32x32 images from
a /4 FQ tokenizer, width 64, 2 backbone + 1 head layer. Trains on the demo
tokenizer's pre-tokenized codes (``data.source = "tokens"``, records of shape
(2, 64)); ``{workdir}`` is filled in by the demo stage runner.
"""

from configs import base
from configs import far_common
from configs import fqgan_demo


def far_demo_config():
  c = far_common.get_config("b", "dual")
  c.seed = 0
  # The runlocal model (head_dim 16: 2D RoPE needs a multiple of 4) over the
  # demo tokenizer's 64 codes.
  m = far_common.runlocal_model(c.model, codebook_size=64)
  m.dtype = "float32"
  d = c.data
  d.source = "tokens"
  d.path = "{workdir}/fq_tokens/train-*.array_record"
  d.image_size = 32
  d.num_classes = 10
  d.random_crop = False
  d.random_flip = False
  # Its centre-crop + mirror files hold a batch's mirror images after its
  # originals (RAR's layout): every record is an example.
  d.crops_per_epoch = "all"
  t = c.train
  t.global_batch_size = 32
  t.num_steps = 2000
  t.log_every = 100
  t.checkpoint_every = 1000
  t.image_every = 1000
  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 100
  s = c.sample
  s.guidance_scale = 2.0
  s.num_samples = 64
  s.batch_size = 32
  s.labels = "balanced"   # the score stage counts the same images per class
  # Its tokenizer is the demo's (configs/fqgan_demo.py), not the paper FQGAN:
  # --config.tokenizer.checkpoint=<that run> decodes its sample grids.
  base.add_tokenizer(c, fqgan_demo.fq_tokenizer_demo_config().model,
                     config_file="configs/fqgan_demo.py")
  return c


def get_config(arg=None):
  base.parse_arg(arg)   # takes none: refuses e.g. "runlocal" (it is CPU-sized)
  return base.finish(far_demo_config())
