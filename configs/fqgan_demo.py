"""Tiny FQGAN-Dual tokenizer for the CPU demo (32x32 shapes, a few minutes).

  python -m genvis_jax.main --config=configs/fqgan_demo.py --workdir=/tmp/fq_tok
  python -m genvis_jax.main --config=configs/fqgan_demo.py --workdir=/tmp/fq_eval \
      --config.mode=evaluate --config.evaluate.checkpoint=/tmp/fq_tok
  python -m genvis_jax.main --config=configs/fqgan_demo.py --workdir=/tmp/fq_pre \
      --config.mode=pretokenize --config.tokenizer.checkpoint=/tmp/fq_tok

Trunk: 32 channels, three levels (32x32 -> 8x8 grid), one res block each;
adapters: 1 layer of width 32 (4 heads); two sub-codebooks (vis, sem) of
64 x 8; a 1-layer feature head on sem (active only with a teacher file).
"""

import ml_collections

from configs import base
from configs import fqgan_common


def fq_tokenizer_demo_config():
  m = fqgan_common.fqgan_model("dual", 16)
  m.update(dict(image_size=32, hidden_channels=32, channel_mult=(1, 1, 1),
                num_res_blocks=1, decoder_res_blocks=1, z_channels=32,
                num_codes=64, code_dim=8, adapter_layers=1, adapter_heads=4,
                feat_heads=(("sem", 32),), feat_layers=1, feat_num_heads=4))
  c = fqgan_common.tokenizer_config(m, "fp32")
  c.seed = 0
  d = c.data
  d.source = "demo"
  d.name = "shapes"
  d.image_size = 32
  d.num_classes = 10
  d.random_crop = False
  d.crop_min_frac = 1.0
  d.random_flip = True
  c.disc.image_size = 32
  c.disc.ndf = 16
  c.disc.n_layers = 2
  c.disc.optimizer.lr = 1e-4
  lo = c.loss
  lo.disc_start = 1500
  lo.rep_group_size = 0           # whole batch as negatives
  c.optimizer.lr = 1e-3
  c.optimizer.warmup_steps = 100
  c.teachers = ()
  t = c.train
  t.global_batch_size = 32
  t.num_steps = 2000
  t.log_every = 100
  t.checkpoint_every = 1000
  t.image_every = 1000
  # --config.mode=evaluate (--config.evaluate.checkpoint=DIR): as the demo's
  # reconstructions stage, not the paper's 50k.
  c.evaluate.num_images = 256
  c.evaluate.batch_size = 64
  # --config.mode=pretokenize (--config.tokenizer.checkpoint=DIR): the demo
  # images, centre crop + mirror, as the demo's pretokenize stage writes them
  # for configs/far_demo.py (the paper's section reads ImageNet at 256 px).
  images = ml_collections.ConfigDict(d.to_dict())
  images.random_flip = False
  c.pretokenize.data = images
  c.pretokenize.ten_crop = False
  return c


def get_config(arg=None):
  base.parse_arg(arg)   # takes none: refuses e.g. "runlocal" (it is CPU-sized)
  return base.finish(fq_tokenizer_demo_config())
