"""Tokenizer trainer task: GAN schedule, adaptive weight, sharded steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import demo
from genvis_jax.train import losses as gan_lib
from genvis_jax.core import sharding as shd
from genvis_jax.train import trainer as trainer_lib
from genvis_jax.train.tasks import gan_tokenizer
from genvis_jax.train.tasks import tokenizer as tok


def _config(disc_start):
  c = demo.tokenizer_config()
  c.model.hidden_channels = 32
  c.model.channel_mult = (1, 2)
  c.model.z_channels = 32
  c.model.code_dim = 32
  c.model.num_codes = 64
  c.disc.n_layers = 1
  c.loss.disc_start = disc_start
  c.train.global_batch_size = 8
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1))
  return c


def _batch(seed):
  r = np.random.RandomState(seed)
  return {"image": r.rand(8, 32, 32, 3).astype(np.float32),
          "label": np.zeros(8, np.int32)}


def test_gan_switches_on_at_disc_start():
  cfg = _config(disc_start=1)
  tr = trainer_lib.Trainer(cfg, mesh=shd.create_mesh(cfg.mesh))
  state = tr.init_state()
  d0 = jax.tree_util.tree_map(np.asarray, state.params["disc"])
  state, m0 = tr.step(state, _batch(0))            # step 0: GAN off
  assert float(m0["adv_weight"]) == 0.0
  assert float(m0["grad_norm/disc"]) == 0.0
  for a, b in zip(jax.tree_util.tree_leaves(d0),
                  jax.tree_util.tree_leaves(state.params["disc"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  state, m1 = tr.step(state, _batch(1))            # step 1: GAN on
  assert float(m1["adv_weight"]) > 0.0
  assert float(m1["grad_norm/disc"]) > 0.0
  assert np.isfinite(float(m1["loss"]))
  for k in ("rec_loss", "quantizer_loss", "disc_loss", "usage", "perplexity"):
    assert k in m1


def test_adaptive_weight_matches_taming_formula():
  g_rec = jnp.full((3, 3, 4, 3), 2.0)
  g_gan = jnp.full((3, 3, 4, 3), 0.5)
  w = gan_tokenizer.adaptive_weight(g_rec, g_gan)
  np.testing.assert_allclose(float(w), np.linalg.norm(np.full(108, 2.0)) /
                             (np.linalg.norm(np.full(108, 0.5)) + 1e-4), rtol=1e-6)
  assert float(gan_tokenizer.adaptive_weight(g_rec, jnp.zeros_like(g_gan))) == 1e4
  # The task's wiring: the reconstruction term's gradient at the last layer
  # over the GAN term's (swapped, or the two summed, passed the above).
  rec_dir, gan_dir = jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 2.0]])
  gen = {"model": {"decoder": {"conv_out": {"kernel": jnp.ones((1, 2))}}}}
  terms = lambda g: ((jnp.sum(g["model"]["decoder"]["conv_out"]["kernel"] *
                              rec_dir), jnp.sum(
                                  g["model"]["decoder"]["conv_out"]["kernel"] *
                                  gan_dir)), None)
  w = gan_tokenizer.GANTokenizerTask._adaptive_weight(None, terms, gen)   # pylint: disable=protected-access
  np.testing.assert_allclose(float(w), 5.0 / (2.0 + 1e-4), rtol=1e-6)


def test_reconstruction_loss_kinds():
  x, y = jnp.zeros((2, 4)), jnp.full((2, 4), 0.5)
  assert float(tok.reconstruction_loss("l1", x, y)) == 0.5
  assert float(tok.reconstruction_loss("l2", x, y)) == 0.25


def test_gan_active():
  assert gan_lib.gan_active(0.1, 5, 10)
  assert not gan_lib.gan_active(0.1, 10, 10)    # never reaches disc_start
  assert not gan_lib.gan_active(0.0, 0, 10)     # zero weight


def test_gan_never_on_skips_discriminator_with_same_update():
  """disc_start >= num_steps: no discriminator in the step, and the same
  gradients as the GAN path at weight 0 (before disc_start)."""
  ref_cfg, off_cfg = _config(disc_start=5), _config(disc_start=10**9)
  ref_cfg.train.num_steps = off_cfg.train.num_steps = 10
  ref, off = tok.TokenizerTask(ref_cfg), tok.TokenizerTask(off_cfg)
  assert ref.use_gan and not off.use_gan
  params = jax.jit(lambda k: nn.unbox(ref.init_params(k)))(jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in _batch(0).items()}
  args = (params, {}, batch, jax.random.key(1), jnp.asarray(0))
  # Each program traced and lowered once: run, and its text read below.
  low_ref, low_off = (jax.jit(t.grads).lower(*args) for t in (ref, off))
  g_ref, m_ref = low_ref.compile()(*args)
  g_off, m_off = low_off.compile()(*args)
  np.testing.assert_allclose(float(m_off["loss"]), float(m_ref["loss"]),
                             rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_ref),
                  jax.tree_util.tree_leaves(g_off)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-7)
  assert all(not np.any(np.asarray(g))
             for g in jax.tree_util.tree_leaves(g_off["disc"]))
  # The GAN-off program has no discriminator convolutions.
  count = lambda lowered: lowered.as_text().count("convolution")
  assert count(low_off) < count(low_ref)


def test_codebook_usage_is_the_whole_batch_s_at_any_micro_batch_count():
  """usage / perplexity averaged over micro-batches fell as micro_batches
  grew at the same global batch (each half uses fewer distinct codes):
  they come from the batch's code histogram, which no metric shows."""
  runs = []
  for k in (1, 2):
    cfg = _config(disc_start=10**9)
    # One level, no down-sampling (the micro-batch scan's compile is the
    # cost), with codes enough that a micro-batch uses fewer of them.
    cfg.model.update(channel_mult=(1,), num_codes=4096)
    cfg.train.micro_batches = k
    cfg.mesh.shape = ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=1))
    tr = trainer_lib.Trainer(cfg, mesh=shd.create_mesh(cfg.mesh,
                                                       jax.devices()[:4]))
    _, metrics = tr.step(tr.init_state(), _batch(0))
    assert not [key for key in metrics if key.startswith("code_counts")]
    runs.append({key: float(metrics[key]) for key in ("usage", "perplexity")})
  one, two = runs
  assert 0 < one["usage"] <= 1
  np.testing.assert_allclose(two["usage"], one["usage"], rtol=1e-6)
  np.testing.assert_allclose(two["perplexity"], one["perplexity"], rtol=1e-5)


def test_generator_terms_take_the_configured_reconstruction_loss():
  """``config.loss.reconstruction`` (FQGAN / LlamaGen: l2; MaskGIT's and the
  demo's: l1) chooses the pixel loss and weights it with the quantizer's
  (a hard-coded kind passed every test)."""
  from types import SimpleNamespace   # pylint: disable=import-outside-toplevel
  recon, images = jnp.full((1, 2, 2, 3), 0.5), jnp.zeros((1, 2, 2, 3))
  model = SimpleNamespace(apply=lambda *a, **k: (
      recon, {"quantizer_loss": jnp.float32(1.0)}))
  for kind, rec in (("l1", 0.5), ("l2", 0.25)):
    task = SimpleNamespace(
        model=model, forward_kwargs=dict, reconstruction=kind,
        reconstruction_weight=2.0, quantizer_weight=3.0, use_lpips=False,
        extra_terms=lambda total, *a: total, adversarial=lambda *a: 0.0)
    (total, _), (_, m) = tok.TokenizerTask.generator_terms(
        task, {"model": {}}, None, {}, images, jax.random.key(0), 0)
    assert float(m["rec_loss"]) == rec, kind
    np.testing.assert_allclose(float(total), 2.0 * rec + 3.0, rtol=1e-6)
