"""``config.mode == "evaluate"``: ``config.evaluate.kind`` names the module.

  tokenizer    reconstruction rFID / LPIPS / PSNR / SSIM / codebook usage
  generation   FID / sFID / IS / precision / recall of a samples npz (ADM)
  demo_fid     demo-scale FID on the demo classifier's features
  class_score  how often samples are classified as their conditioning class

Each is ``genvis_jax/evaluate/<kind>.py`` defining ``evaluate(config, workdir)``
(see ``genvis_jax.core.registry``).
"""

from __future__ import annotations

from genvis_jax.core import registry


def run(config, workdir: str):
  mod = registry.module("genvis_jax.evaluate", config.evaluate.kind,
                        ("evaluate",), setting="config.evaluate.kind")
  return mod.evaluate(config, workdir)
