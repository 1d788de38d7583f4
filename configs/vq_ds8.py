"""LlamaGen VQ-8 tokenizer (FQGAN's single-codebook baseline, k = 1).

256px -> 32x32 tokens, one 16384 x 8 L2-normalised codebook; official
checkpoint vq_ds8_c2i.pt. Trained with the FQGAN recipe (configs/fqgan_common.py: lr 2e-4, batch 256);
``:llamagen`` takes LlamaGen's own launch (lr 1e-4, batch 128, 40 epochs of
10,009 steps).

  python -m genvis_jax.main --config=configs/vq_ds8.py --workdir=DIR \
      --config.data.path=TFDS_DIR --config.loss.lpips_path=vgg_lpips.npz
"""

from configs import base
from configs import fqgan_common


def get_config(arg=None):
  return base.finish(fqgan_common.tokenizer_config(
      fqgan_common.cnn_model("llamagen_vq", 8), arg))
