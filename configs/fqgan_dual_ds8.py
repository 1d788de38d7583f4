"""FQGAN-Dual tokenizer, ds8: 256px -> 32x32 grid per sub-codebook.

Official checkpoint fqgan_dual_ds8.pt; CLIP ViT-L/14 teacher on the sem head
(representation loss off until config.teachers[i].path points at local weights).

  python -m genvis_jax.main --config=configs/fqgan_dual_ds8.py --workdir=DIR \
      --config.data.path=TFDS_DIR --config.loss.lpips_path=vgg_lpips.npz \
      --config.teachers[0].path=TEACHER.npz
"""

from configs import base
from configs import fqgan_common


def get_config(arg=None):
  return base.finish(fqgan_common.fqgan_config("dual", 8, arg))
