"""FQGAN -> FAR through the paper configs with ``runlocal``, every mode as the
CLI runs it: fqgan_{dual,triple}_ds16 train -> pretokenize with the tokenizer
config itself (ten-crop, k code maps per record) -> far_b:{dual,triple} train
-> sample (npz + grid). Grids while training run for the dual variant alone.
The evaluation sees only the sampled images; the RAR pipeline evaluates
samples of the same format ((16, 32, 32, 3) uint8), so it is not repeated
here."""

import os

import pytest

from genvis_jax.data import tokens as tokens_lib
from tests import pipeline_common as pc

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant,k", [("dual", 2), ("triple", 3)])
def test_fqgan_far_paper_pipeline(tmp_path, variant, k):
  w = str(tmp_path)
  tok_spec = f"fqgan_{variant}_ds16.py:runlocal"
  far_spec = f"far_b.py:{variant},runlocal"
  tok = os.path.join(w, "tokenizer")
  # The GAN (adaptive weight) from step 2; off for triple, whose quantizer
  # branch is what differs (a smaller step to compile).
  pc.run_mode(tok_spec, tok, **pc.steps(4), **{
      "loss.disc_start": 2 if variant == "dual" else 10**9})
  # Reconstructions of a batch kept for a resume's grids (a generator's
  # grids show samples: nothing kept, below).
  assert sorted(os.listdir(os.path.join(tok, "images"))) == [
      "reconstruction_0000004.png", "visual_batch.npz"]

  pre = pc.run_mode(tok_spec, os.path.join(w, "pretokenize"),
                    **{"mode": "pretokenize", "tokenizer.checkpoint": tok})
  cfg = pc.load_config(far_spec)
  assert pre["records"] == 10 * cfg.pretokenize.data.num_examples
  tokens = tokens_lib.TokenSource(pre["pattern"])[0]["tokens"]
  assert tokens.shape == (k, cfg.model.grid ** 2)     # k sub-token maps
  assert tokens.max() < cfg.model.codebook_size

  far = os.path.join(w, "far")
  dual = variant == "dual"
  pc.run_mode(far_spec, far, **{"data.path": pre["pattern"],
                                "tokenizer.checkpoint": tok,
                                **pc.steps(4),
                                "train.image_every": 4 if dual else 0})
  assert pc.latest_step(os.path.join(far, "checkpoints")) == 4
  if dual:   # sample grids while training, decoded by the tokenizer
    assert os.listdir(os.path.join(far, "images")) == ["samples_0000004.png"]

  out = pc.run_mode(far_spec, os.path.join(w, "samples"), **{
      "mode": "sample", "init_from": far, "tokenizer.checkpoint": tok})
  pc.check_samples(out, (16, 32, 32, 3))
