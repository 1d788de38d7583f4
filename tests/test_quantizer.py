"""VectorQuantizer: nearest neighbour, losses, straight-through, l2 variant, entropy, usage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.models.quantizers import (VectorQuantizer, entropy_loss,
                                         usage_from_counts)

K, D = 16, 8


def _setup(l2_norm=False, entropy_weight=0.0, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(2, 3, 5, D)).astype(np.float32)
  book = rng.normal(size=(K, D)).astype(np.float32)
  vq = VectorQuantizer(K, D, beta=0.25, l2_norm=l2_norm,
                       entropy_weight=entropy_weight)
  params = {"params": {"embedding": jnp.asarray(book)}}
  return vq, params, z, book


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_entropy_loss(affinity, temperature):
  a = affinity.reshape(-1, affinity.shape[-1]).astype(np.float64) / temperature
  a = a - a.max(-1, keepdims=True)
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  logp = a - np.log(np.exp(a).sum(-1, keepdims=True))
  avg = p.mean(0)
  return -(p * logp).sum(-1).mean() + (avg * np.log(avg + 1e-5)).sum()


def test_init_shapes_and_logical_names():
  vq = VectorQuantizer(K, D)
  variables = vq.init(jax.random.key(0), jnp.zeros((1, 2, 2, D)))
  box = variables["params"]["embedding"]
  assert box.names == ("vocab", "codebook_dim")
  assert box.value.shape == (K, D)
  assert float(jnp.abs(box.value).max()) <= 1.0 / K


def test_nearest_neighbour_matches_brute_force():
  vq, params, z, book = _setup()
  z_q, codes, _ = vq.apply(params, jnp.asarray(z))
  d = ((z[..., None, :] - book) ** 2).sum(-1)
  want = d.argmin(-1)
  assert codes.dtype == jnp.int32 and codes.shape == z.shape[:-1]
  np.testing.assert_array_equal(np.asarray(codes), want)
  np.testing.assert_allclose(np.asarray(z_q), book[want], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(vq.apply(params, jnp.asarray(z), method="nearest")), want)
  np.testing.assert_allclose(
      np.asarray(vq.apply(params, jnp.asarray(want), method="lookup")),
      book[want])


def test_loss_values_and_gradients():
  vq, params, z, book = _setup()
  z_q, codes, aux = vq.apply(params, jnp.asarray(z))
  mse = np.mean((book[np.asarray(codes)] - z) ** 2)
  np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(aux["commitment_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(aux["quantizer_loss"], 1.25 * mse, rtol=1e-5)
  assert float(aux["entropy_loss"]) == 0.0

  def loss(p, zz, name):
    return vq.apply(p, zz)[2][name]
  # Codebook loss moves only codes; commitment loss moves only latents.
  g_book = jax.grad(loss)(params, jnp.asarray(z), "commitment_loss")
  assert float(jnp.abs(g_book["params"]["embedding"]).max()) == 0.0
  g_z = jax.grad(loss, argnums=1)(params, jnp.asarray(z), "codebook_loss")
  assert float(jnp.abs(g_z).max()) == 0.0
  g_z = jax.grad(loss, argnums=1)(params, jnp.asarray(z), "commitment_loss")
  want = 2 * (z - book[np.asarray(codes)]) / z.size
  np.testing.assert_allclose(np.asarray(g_z), want, rtol=1e-4, atol=1e-8)
  # The total pulls the latents with beta and the codes with 1 (LlamaGen
  # vq_model.py: codebook_loss + beta * commitment_loss; beta on the other
  # term gives the same value).
  g_p, g_z = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(z),
                                            "quantizer_loss")
  np.testing.assert_allclose(np.asarray(g_z), 0.25 * want, rtol=1e-4, atol=1e-8)
  want_book = np.zeros_like(book)
  np.add.at(want_book, np.asarray(codes).reshape(-1), -want.reshape(-1, D))
  np.testing.assert_allclose(np.asarray(g_p["params"]["embedding"]), want_book,
                             rtol=1e-4, atol=1e-8)

  # Straight-through: d sum(w * z_q) / dz = w.
  w = np.random.default_rng(1).normal(size=z.shape).astype(np.float32)
  g = jax.grad(lambda zz: jnp.sum(vq.apply(params, zz)[0] * w))(jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_l2_normalised_variant():
  vq, params, z, book = _setup(l2_norm=True)
  z_q, codes, aux = vq.apply(params, jnp.asarray(z))
  zn, bn = _np_normalize(z), _np_normalize(book)
  want = (zn @ bn.T).argmax(-1)  # max cosine similarity
  np.testing.assert_array_equal(np.asarray(codes), want)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z_q), axis=-1), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(aux["codebook_loss"],
                             np.mean((bn[want] - zn) ** 2), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(vq.apply(params, jnp.asarray(want), method="lookup")),
      bn[want], rtol=1e-5)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_entropy_loss_matches_numpy(l2_norm):
  vq, params, z, book = _setup(l2_norm=l2_norm, entropy_weight=0.1)
  _, _, aux = vq.apply(params, jnp.asarray(z))
  zf = z.reshape(-1, D)
  if l2_norm:
    zf, book = _np_normalize(zf), _np_normalize(book)
  d = ((zf[:, None] - book[None]) ** 2).sum(-1)
  want = _np_entropy_loss(-d, 0.01)
  np.testing.assert_allclose(aux["entropy_loss"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      aux["quantizer_loss"],
      aux["codebook_loss"] + 0.25 * aux["commitment_loss"] + 0.1 * want,
      rtol=1e-5)
  # Temperature matters: a soft temperature gives a different value.
  soft = entropy_loss(jnp.asarray(-d), temperature=10.0)
  np.testing.assert_allclose(soft, _np_entropy_loss(-d, 10.0), rtol=1e-4)


def test_entropy_loss_per_image_group():
  """entropy_group_size: the mean of each group's loss (the official loss ran
  per GPU and DDP averaged it), not the whole batch's."""
  rng = np.random.default_rng(3)
  z = rng.normal(size=(4, 3, 5, D)).astype(np.float32)
  book = rng.normal(size=(K, D)).astype(np.float32)
  params = {"params": {"embedding": jnp.asarray(book)}}
  d = ((z.reshape(4, -1, 1, D) - book) ** 2).sum(-1)         # (4, 15, K)
  aux = lambda g, train=True: VectorQuantizer(K, D, entropy_weight=0.1, entropy_group_size=g,
                                  entropy_temperature=1.0).apply(
                                      params, jnp.asarray(z), train)[2]["entropy_loss"]
  halves = np.mean([_np_entropy_loss(-d[i:i + 2], 1.0) for i in (0, 2)])
  np.testing.assert_allclose(aux(2), halves, rtol=1e-4)
  whole = _np_entropy_loss(-d, 1.0)
  np.testing.assert_allclose(aux(0), whole, rtol=1e-4)
  np.testing.assert_allclose(aux(4), whole, rtol=1e-4)
  assert abs(halves - whole) > 1e-3
  with pytest.raises(ValueError, match="not divisible by config.model.entropy_group_size 3"):
    aux(3)
  np.testing.assert_allclose(aux(3, train=False), whole, rtol=1e-4)   # reported only


def test_usage_and_perplexity():
  book = np.eye(K, D, dtype=np.float32) * 10  # codes 0..7 are one-hot axes
  z = np.zeros((1, 2, 4, D), np.float32)
  picks = [0, 0, 1, 1, 2, 2, 3, 3]  # 4 codes, uniform
  z[0].reshape(-1, D)[np.arange(8), picks] = 10.0
  vq = VectorQuantizer(K, D)
  _, codes, aux = vq.apply({"params": {"embedding": book}}, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), picks)
  np.testing.assert_allclose(aux["usage"], 4 / K)
  np.testing.assert_allclose(aux["perplexity"], 4.0, rtol=1e-5)
  # A code seen once counts as used.
  assert float(usage_from_counts(jnp.array([0.0, 1.0, 2.0, 0.0]))["usage"]) == 0.5


def test_bad_inputs_raise():
  vq, params, z, _ = _setup()
  with pytest.raises(ValueError, match="code_dim"):
    vq.apply(params, jnp.zeros((1, 2, 2, D + 1)))
  with pytest.raises(TypeError, match="integers"):
    vq.apply(params, jnp.zeros((2,)), method="lookup")
