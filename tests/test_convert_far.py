"""FAR conversion: the official key layout (showlab/FQGAN ``far_dual.py`` /
``far_triple.py``, restated below) maps 1:1 onto the configs, and the renamed
weights land where the model reads them."""

import jax
import numpy as np
import pytest

from configs import far_common
from genvis_jax import convert, models
from genvis_jax.models.far import ffn_hidden_dim


def _official_shapes(m):
  """Official ``Transformer`` state-dict keys -> torch shapes (Linear: (out, in)).

  LlamaGen GPT with k token tables and outputs, ``aggregation_layer``
  (k d -> d, with bias), ``layers`` / ``ar_head`` of TransformerBlocks
  (bias-free wqkv, wo, w1, w3, w2; RMSNorm weights), ``norm``; the class
  table has the extra CFG row; ``freqs_cis`` is not a buffer."""
  d, k, v = m.dim, m.num_codebooks, m.codebook_size
  hidden = ffn_hidden_dim(d, m.get("multiple_of", 256))
  s = {"cls_embedding.embedding_table.weight": (m.num_classes + 1, d),
       "aggregation_layer.weight": (d, k * d), "aggregation_layer.bias": (d,),
       "norm.weight": (d,)}
  for i in range(1, k + 1):
    s[f"tok_embeddings_{i}.weight"] = (v, d)
    s[f"output_{i}.weight"] = (v, d)
  block = {"attention.wqkv": (3 * d, d), "attention.wo": (d, d),
           "feed_forward.w1": (hidden, d), "feed_forward.w3": (hidden, d),
           "feed_forward.w2": (d, hidden), "attention_norm": (d,),
           "ffn_norm": (d,)}
  for lst, n in (("layers", m.n_layer), ("ar_head", m.n_head_layer)):
    for i in range(n):
      for name, shape in block.items():
        s[f"{lst}.{i}.{name}.weight"] = shape
  return s


@pytest.mark.parametrize("variant", ["dual", "triple"])
def test_far_b_official_key_layout_matches_config_exactly(variant):
  cfg = far_common.get_config("b", variant).model
  shapes = _official_shapes(cfg)
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, v) for k, v in shapes.items()}  # no memory
  params = convert.from_torch("far", state, cfg)  # raises on any mismatch
  assert models.count_params(params) == sum(
      int(np.prod(s)) for s in shapes.values())
  blk = params["ar_head_2"]
  assert set(blk["attention"]) == {"qkv", "out"}
  assert set(blk["feed_forward"]) == {"fc1_g", "fc1_x", "fc2"}


def test_far_renamed_weights_are_transposed_to_their_roles():
  cfg = far_common.get_config("b", "dual").model
  cfg.update(dict(codebook_size=8, num_classes=3, grid=2, dim=16, n_layer=1,
                  n_head=2, n_head_layer=1, multiple_of=8))
  r = np.random.default_rng(0)
  state = {k: r.normal(size=s).astype(np.float32)
           for k, s in _official_shapes(cfg).items()}
  params = convert.from_torch("far", state, cfg)
  for lst in ("layers_0", "ar_head_0"):
    off = ".".join(lst.rsplit("_", 1))
    att, ff = params[lst]["attention"], params[lst]["feed_forward"]
    # w1 is the SiLU (gate) branch, w3 the linear one (LlamaGen FeedForward).
    for got, name in ((att["qkv"], "attention.wqkv"), (att["out"], "attention.wo"),
                      (ff["fc1_g"], "feed_forward.w1"),
                      (ff["fc1_x"], "feed_forward.w3"),
                      (ff["fc2"], "feed_forward.w2")):
      np.testing.assert_array_equal(got["kernel"], state[f"{off}.{name}.weight"].T)
    np.testing.assert_array_equal(params[lst]["ffn_norm"]["scale"],
                                  state[f"{off}.ffn_norm.weight"])
  np.testing.assert_array_equal(
      params["cls_embedding"]["embedding_table"]["embedding"],
      state["cls_embedding.embedding_table.weight"])
  np.testing.assert_array_equal(params["tok_embeddings_2"]["embedding"],
                                state["tok_embeddings_2.weight"])
  # The converted tree is what the model applies.
  model = models.build(cfg)
  codes = np.zeros((1, 2, 4), np.int32)
  out = jax.jit(model.apply)({"params": params}, codes, np.array([1]))
  assert out.shape == (1, 2, 4, 8) and np.isfinite(np.asarray(out)).all()
