"""FQGAN / FAR CPU demo: factorized tokenizer -> tokens -> FAR -> samples.

  python -m genvis_jax.main --config=configs/demo_fqgan.py --workdir=/tmp/fq_demo

Same stage runner and data as ``configs/demo.py`` (generated 32x32 shapes):
  fq_tokenizer     FQGAN-Dual (vis + sem sub-codebooks of 64 x 8, 8x8 grid)
  reconstructions  PSNR / SSIM and codebook usage per sub-codebook
  classifier       the sample judge (as in the RAR demo)
  pretokenize      (class, 2 x 64 sub-token) records
  far              FAR: backbone + factorized head over the 2 sub-tokens
  samples          CFG over all sub-tokens, decoded by the FQ tokenizer
  score            how often the classifier recognises the conditioned class
"""

import ml_collections

from configs import base
from configs import demo
from configs import far_demo
from configs import fqgan_demo


def _tokenizer(stage_cfg):
  return base.add_tokenizer(stage_cfg, fqgan_demo.fq_tokenizer_demo_config().model,
                            checkpoint="{workdir}/fq_tokenizer",
                            config_file="configs/fqgan_demo.py")


def fq_tokenizer_config():
  c = fqgan_demo.fq_tokenizer_demo_config()
  c.train.num_steps = 1000
  c.train.checkpoint_every = 500
  c.train.image_every = 500
  c.loss.disc_start = 700
  return c


def reconstructions_config():
  c = demo.reconstructions_config()
  c.model = fqgan_demo.fq_tokenizer_demo_config().model
  c.evaluate.checkpoint = "{workdir}/fq_tokenizer"
  return c


def pretokenize_config():
  c = _tokenizer(base.get_config())
  c.mode = "pretokenize"
  images = ml_collections.ConfigDict({"data": base.get_config().data})
  demo._demo_data(images)  # pylint: disable=protected-access
  base.add_pretokenize(c, images.data, ten_crop=False, batch_size=500)
  c.pretokenize.output = "{workdir}/fq_tokens/train"
  return c


def far_config():
  c = _tokenizer(far_demo.far_demo_config())
  c.data.path = "{workdir}/fq_tokens/train-*.array_record"
  c.train.num_steps = 1000
  c.train.checkpoint_every = 500
  c.train.image_every = 0
  c.sample.num_samples = 100
  # One batch of the 100, padded to a multiple of 8 devices (a TPU v2-8).
  c.sample.batch_size = 104
  return c


def samples_config():
  c = far_config()
  c.mode = "sample"
  c.init_from = "{workdir}/far"
  return c


def get_config(arg=None):
  arg = base.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.mode = "demo"
  c.only = ""
  c.stages = ml_collections.ConfigDict()
  c.stages.fq_tokenizer = fq_tokenizer_config()
  c.stages.reconstructions = reconstructions_config()
  c.stages.classifier = demo.classifier_config()
  c.stages.pretokenize = pretokenize_config()
  c.stages.far = far_config()
  c.stages.samples = samples_config()
  c.stages.score = demo.score_config()
  c.stage_order = ("fq_tokenizer", "reconstructions", "classifier", "pretokenize",
                   "far", "samples", "score")
  if arg.smoke:
    for name in ("fq_tokenizer", "classifier", "far"):
      t = c.stages[name].train
      t.num_steps, t.log_every, t.checkpoint_every = 4, 2, 4
      t.image_every = 0
    # GAN off (a smaller step to compile): its step runs in the paper
    # pipeline (tests/test_pipeline_fqgan.py, disc_start 2).
    c.stages.fq_tokenizer.loss.disc_start = 10**9
    c.stages.reconstructions.evaluate.num_images = 16
    c.stages.pretokenize.pretokenize.data.num_examples = demo.SMOKE_TOKEN_IMAGES
    c.stages.samples.sample.num_samples = 16
    c.stages.samples.sample.batch_size = 8
    c.stages.score.evaluate.min_accuracy = 0.0
  return base.finish(c)
