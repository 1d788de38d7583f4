"""Task interface: frozen weights as their own argument, the tokenizer's pixel
range from its model class, the shared GAN-tokenizer step."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import demo
from genvis_jax import models
from genvis_jax.errors import ConfigError, UserError
from genvis_jax.train import step as step_lib
from genvis_jax.train.state import TrainState
from genvis_jax.train.tasks import GroupClashError, Task, get_task, join_groups
from genvis_jax.train.tasks.gan_tokenizer import GANTokenizerTask


class _ScaleTask(Task):
  """loss = mean((frozen["model"] * params["model"]["w"] - x)^2): a frozen
  group named like a trained one must not replace it."""

  def grads(self, params, frozen, batch, rng, step):
    f = lambda p: jnp.mean(jnp.square(frozen["model"] * p["w"] - batch["x"]))
    loss, g = jax.value_and_grad(f)(params["model"])
    return {"model": g}, {"loss": loss}


def _start(opt, w: float, ema: bool = False):
  """(params, step-0 TrainState) of a one-weight model ``{"model": {"w"}}``
  under ``opt``, its EMA starting at the weights when ``ema``."""
  params = {"model": {"w": jnp.float32(w)}}
  return params, TrainState(
      step=jnp.int32(0), params=params,
      opt_state={"model": opt["model"].init(params["model"])},
      ema=params["model"] if ema else None)


def test_train_step_passes_frozen_separately():
  cfg = ml_collections.ConfigDict(dict(micro_batches=2, ema_decay=0.0))
  opt = {"model": optax.sgd(1.0)}
  task = _ScaleTask(None)
  params, state = _start(opt, 1.0)
  x = jnp.arange(4, dtype=jnp.float32)
  frozen = {"model": jnp.float32(3.0)}
  new, m = jax.jit(step_lib.make_train_step(task, opt, cfg, 1))(
      state, {"x": x}, jax.random.key(0), frozen)
  # d/dw mean((3w - x)^2) = mean(6 (3w - x)) at w = 1.
  want_loss = np.mean(np.square(3.0 - np.arange(4)))
  want_w = 1.0 - np.mean(6.0 * (3.0 - np.arange(4)))
  np.testing.assert_allclose(float(m["loss"]), want_loss, rtol=1e-6)
  np.testing.assert_allclose(float(new.params["model"]["w"]), want_w, rtol=1e-6)


class _DropTask(Task):
  """loss = mean(keep * (w - x)^2), ``keep`` a per-example draw from ``rng``
  (like RAR's label dropout) unless ``self.p`` is 0."""
  p = 0.5

  def grads(self, params, frozen, batch, rng, step):
    keep = jax.random.bernoulli(rng, 1.0 - self.p, batch["x"].shape)
    f = lambda q: jnp.mean(keep * jnp.square(q["w"] - batch["x"]))
    loss, g = jax.value_and_grad(f)(params["model"])
    return {"model": g}, {"loss": loss}


def test_micro_batches_match_the_full_batch_in_expectation_only():
  """Micro-batch i draws with fold_in(rng, i), not the full batch's rows of
  its draws (README: not the same update bit for bit); with nothing random
  drawn, the same update up to float rounding."""
  task, opt = _DropTask(None), {"model": optax.sgd(1.0)}
  params, state = _start(opt, 0.0)
  x = {"x": jnp.arange(16, dtype=jnp.float32)}

  def w_after(k, keys, p=0.5):   # w after one step from each key, (n,)
    task.p = p
    cfg = ml_collections.ConfigDict(dict(micro_batches=k, ema_decay=0.0))
    step = step_lib.make_train_step(task, opt, cfg, 1)
    one = lambda key: step(state, x, key, {})[0].params["model"]["w"]
    return np.asarray(jax.jit(jax.vmap(one))(keys))

  keys = jax.random.split(jax.random.key(0), 2000)
  micro, full = w_after(2, keys), w_after(1, keys)
  assert (micro != full).mean() > 0.9
  # Both average the update of keep = 1/2: w = mean(x) = 7.5.
  np.testing.assert_allclose([micro.mean(), full.mean()], 7.5, rtol=0.03)
  np.testing.assert_allclose(w_after(2, keys[:2], p=0.0),
                             w_after(1, keys[:2], p=0.0), rtol=1e-6)


def test_skipped_nonfinite_step_keeps_schedule_in_step():
  """A NaN step keeps the float state and still advances the step and the
  optimizer's counts together: the schedule is read at state.step."""
  cfg = ml_collections.ConfigDict(dict(micro_batches=1, ema_decay=0.0))
  sched = lambda count: 1.0 + count.astype(jnp.float32)
  opt = {"model": optax.adamw(sched)}
  task = _ScaleTask(None)
  params, state = _start(opt, 1.0)
  step = jax.jit(step_lib.make_train_step(task, opt, cfg, 1))
  frozen = {"model": jnp.float32(3.0)}
  good, bad = {"x": jnp.arange(4.0)}, {"x": jnp.full((4,), jnp.nan)}
  for batch in (good, bad, bad, good):
    before = state
    state, m = step(state, batch, jax.random.key(0), frozen)
  counts = [int(c) for c in jax.tree_util.tree_leaves(state.opt_state)
            if jnp.issubdtype(c.dtype, jnp.integer)]
  assert int(state.step) == 4 and counts and set(counts) == {4}, counts
  assert float(m["nonfinite"]) == 0.0
  # The last step ran at the schedule's value for step 3 (lr 4) from the
  # state the NaN steps left alone.
  mu = before.opt_state["model"][0].mu["w"]
  assert float(mu) != 0.0 and np.isfinite(float(state.params["model"]["w"]))
  _, nan_m = step(before, bad, jax.random.key(0), frozen)
  assert float(nan_m["nonfinite"]) == 1.0


class _NonfiniteTask(Task):
  """A finite loss with an Inf gradient (``batch["what"] == 1``) or a NaN
  loss with a finite gradient (2): NaN images make both NaN, which cannot
  tell whether each is checked."""

  def grads(self, params, frozen, batch, rng, step):
    w = params["model"]["w"]
    g = jnp.where(batch["what"][0] == 1, jnp.inf, jnp.ones_like(w))
    loss = jnp.where(batch["what"][0] == 2, jnp.nan, jnp.mean(batch["x"]) * w)
    return {"model": {"w": g}}, {"loss": loss}


@pytest.mark.parametrize("what", ["gradient", "loss"])
def test_a_nonfinite_gradient_or_loss_alone_skips_the_update(what):
  """make_train_step: a non-finite loss or gradient leaves the float state."""
  cfg = ml_collections.ConfigDict(dict(micro_batches=1, ema_decay=0.0))
  opt = {"model": optax.sgd(0.1)}
  _, state = _start(opt, 1.0)
  step = jax.jit(step_lib.make_train_step(_NonfiniteTask(None), opt, cfg, 1))
  code = {"gradient": 1, "loss": 2}[what]
  new, m = step(state, {"x": jnp.ones(2), "what": jnp.full(2, code)},
                jax.random.key(0), {})
  assert float(m["nonfinite"]) == 1.0
  assert float(new.params["model"]["w"]) == 1.0 and int(new.step) == 1


def test_micro_batch_i_draws_with_fold_in_of_i():
  """accumulate_grads: micro-batch i's key is fold_in(rng, i) (one key for
  all would draw the same dropout / noise k times)."""
  def grads_fn(params, batch, rng, step):
    u = jax.random.uniform(rng)
    return {"model": {"w": u}}, {"loss": u}
  rng, k = jax.random.key(3), 4
  g, m = step_lib.accumulate_grads(grads_fn, {}, {"x": jnp.zeros(8)}, rng, 0, k, 1)
  want = np.mean([float(jax.random.uniform(jax.random.fold_in(rng, i)))
                  for i in range(k)])
  assert float(g["model"]["w"]) == pytest.approx(want, rel=1e-6)
  assert float(m["loss"]) == pytest.approx(want, rel=1e-6)
  # Micro-batch i takes the i-th slice of each of the 4 data shards, so no
  # example moves between devices.
  micro = np.asarray(step_lib.split_micro_batches({"r": jnp.arange(16)}, 2, 4)["r"])
  np.testing.assert_array_equal(micro, [[0, 1, 4, 5, 8, 9, 12, 13],
                                        [2, 3, 6, 7, 10, 11, 14, 15]])


def test_the_batch_usage_of_sub_codebooks_and_their_mean():
  """usage_of_batch: each sub-codebook's usage and perplexity from its
  histogram, and the unsuffixed ones their mean (FQGAN logs both)."""
  from genvis_jax.models import quantizers  # pylint: disable=import-outside-toplevel
  c = quantizers.COUNTS
  m = step_lib.usage_of_batch({f"{c}/vis": jnp.array([2.0, 2, 0, 0]),
                               f"{c}/sem": jnp.array([4.0, 0, 0, 0]), "loss": 1.0})
  want = {"usage/vis": 0.5, "usage/sem": 0.25, "usage": 0.375,
          "perplexity/vis": 2.0, "perplexity/sem": 1.0, "perplexity": 1.5}
  assert {k: pytest.approx(float(v), rel=1e-6) for k, v in m.items() if k != "loss"} == want
  assert m["loss"] == 1.0


def test_a_skipped_steps_metrics_leave_its_intervals_means():
  """A NaN step's metrics count as nothing in its log interval's means (its
  NaN loss made the whole interval's NaN), its code histogram included (an
  empty one has perplexity 1, which lifted a 4-code interval's to 4.33)."""
  from genvis_jax.models import quantizers  # pylint: disable=import-outside-toplevel

  class Codes(_ScaleTask):
    def grads(self, params, frozen, batch, rng, step):
      g, m = super().grads(params, frozen, batch, rng, step)
      return g, {**m, quantizers.COUNTS: jnp.ones((4,), jnp.float32)}

  cfg = ml_collections.ConfigDict(dict(micro_batches=1, ema_decay=0.0))
  opt = {"model": optax.sgd(0.1)}
  params, state = _start(opt, 1.0)
  step = jax.jit(step_lib.make_train_step(Codes(None), opt, cfg, 1))
  sums = None
  for x in (1.0, np.nan, 1.0, 1.0):
    state, m = step(state, {"x": jnp.full((4,), x)}, jax.random.key(0),
                    {"model": jnp.float32(1.0)})
    sums = m if sums is None else jax.tree_util.tree_map(jnp.add, sums, m)
  means = step_lib.interval_means(jax.device_get(sums), 4)
  assert means["nonfinite"] == 0.25
  assert np.isfinite(means["loss"]) and np.isfinite(means["grad_norm/model"])
  assert means["perplexity"] == pytest.approx(4.0)
  assert means["usage"] == pytest.approx(1.0)


def test_ema_warmup_is_litema():
  """ema_warmup: the decay LitEma(use_num_upates=True) uses, counting updates
  from 1; the step's EMA takes it."""
  def litema(num_updates, decay=0.99):          # taming / LDM ema.py, restated
    return min(decay, (1 + num_updates) / (10 + num_updates))
  got = [float(step_lib.ema_decay_at(jnp.int32(s), 0.99, True)) for s in range(2000)]
  np.testing.assert_allclose(got, [litema(s + 1) for s in range(2000)], rtol=1e-6)
  assert float(step_lib.ema_decay_at(jnp.int32(0), 0.99, False)) == np.float32(0.99)

  cfg = ml_collections.ConfigDict(dict(micro_batches=1, ema_decay=0.99,
                                       ema_warmup=True))
  opt = {"model": optax.sgd(1.0)}
  task = _ScaleTask(None)
  params, state = _start(opt, 1.0, ema=True)
  new, _ = jax.jit(step_lib.make_train_step(task, opt, cfg, 1))(
      state, {"x": jnp.arange(4.0)}, jax.random.key(0), {"model": jnp.float32(3.0)})
  w1, d = float(new.params["model"]["w"]), litema(1)
  np.testing.assert_allclose(float(new.ema["w"]), d * 1.0 + (1 - d) * w1, rtol=1e-6)


def test_join_groups_refuses_a_clash():
  assert join_groups({"a": 1}, {"vit": 2}) == {"a": 1, "vit": 2}
  with pytest.raises(GroupClashError, match=r"\['vit'\].*Remove") as e:
    join_groups({"a": 1, "vit": 3}, {"vit": 2})
  assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("config_name,name,want", [
    ("maskgit_vqgan", "maskgit_vqgan", (0.0, 1.0)),
    ("vq_ds16", "llamagen_vq", (-1.0, 1.0)),
    ("fqgan_dual_ds16", "fqgan", (-1.0, 1.0)),
    ("eq_tokenizer", "eq_tokenizer", (-1.0, 1.0))])
def test_value_range_is_the_tokenizer_models(config_name, name, want):
  """The official models' ranges: MaskGIT VQGAN [0, 1]; LlamaGen, FQGAN and
  the Equivariant tokenizer [-1, 1]."""
  cfg = importlib.import_module(f"configs.{config_name}").get_config().model
  assert cfg.name == name and models.value_range(cfg) == want


def test_value_range_errors_name_both_ranges():
  with pytest.raises(ConfigError, match="not an image tokenizer"):
    models.value_range(ml_collections.ConfigDict(dict(name="patchgan")))
  c = demo.tokenizer_config()
  assert models.value_range(c.model, c, ("data",)) == (0.0, 1.0)
  c.data.value_range = (-1.0, 1.0)
  with pytest.raises(ConfigError, match=r"\(-1.0, 1.0\).*\(0.0, 1.0\)"):
    get_task(c)


def _tiny_tokenizer_config():
  c = demo.tokenizer_config()
  c.model.update(dict(hidden_channels=32, channel_mult=(1,), z_channels=32,
                      code_dim=32, num_codes=64))
  c.disc.n_layers = 1
  c.loss.disc_start = 0
  c.loss.adaptive_gan_weight = True
  c.train.num_steps = 10
  return c


def test_adaptive_weight_matches_taming_formula_on_full_gradients():
  """The shared step's one-backward adaptive weight equals taming's
  |d rec / dW| / (|d adv / dW| + 1e-4) * gan_weight (W = decoder.conv_out
  kernel) computed from two full gradients, and the model gradient equals
  d rec + w * d adv."""
  task = get_task(_tiny_tokenizer_config())
  assert isinstance(task, GANTokenizerTask) and task.use_gan
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  rng, step = jax.random.key(2), jnp.int32(3)
  grads, metrics = jax.jit(task.grads)(params, {}, {"image": images}, rng, step)

  @jax.jit
  def full_grads(p_model):
    def term(i):
      return lambda pm: task.generator_terms(
          {"model": pm}, params["disc"], {}, images, rng, step)[0][i]
    return jax.grad(term(0))(p_model), jax.grad(term(1))(p_model)

  g_rec, g_adv = full_grads(params["model"])
  last = lambda g: np.asarray(g["decoder"]["conv_out"]["kernel"], np.float64)
  ratio = np.linalg.norm(last(g_rec)) / (np.linalg.norm(last(g_adv)) + 1e-4)
  w = min(ratio, 1e4) * task.config.loss.gan_weight
  np.testing.assert_allclose(float(metrics["adv_weight"]), w, rtol=1e-5)
  want = jax.tree_util.tree_map(
      lambda a, b: np.asarray(a, np.float64) + w * np.asarray(b, np.float64),
      g_rec, g_adv)
  # Leaves with a zero true gradient (biases before a norm) hold float noise.
  scale = max(np.max(np.abs(x)) for x in jax.tree_util.tree_leaves(want))
  for got, x in zip(jax.tree_util.tree_leaves(grads["model"]),
                    jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-5 * scale)


def test_loss_hyperparameters_come_from_the_config_only():
  """A task reads its loss weights and schedules from the config, with no
  default of its own to drift from the paper configs: a missing one is a
  ConfigError naming the field; a set one is used as given."""
  cfg = demo.get_config().stages.rar
  cfg.train.label_dropout = 0.25
  assert get_task(cfg).label_dropout == 0.25
  with cfg.unlocked():
    del cfg.train["label_dropout"]
  with pytest.raises(ConfigError, match=r"config\.train\.label_dropout is not set"):
    get_task(cfg)
  tok = demo.get_config().stages.tokenizer
  with tok.unlocked():
    del tok.loss["adaptive_gan_weight"]
  with pytest.raises(ConfigError, match=r"config\.loss\.adaptive_gan_weight"):
    get_task(tok)


def test_each_step_draws_fold_in_of_its_step():
  """Step s's task draws from ``fold_in(rng, s)``: with one key for every
  step, dropout, label dropout and RAR's orders repeated each step, and the
  resume tests (both runs drawing alike) could not see it."""

  class RngTask(Task):
    def grads(self, params, frozen, batch, rng, step):
      return ({"model": jax.tree_util.tree_map(jnp.zeros_like,
                                               params["model"])},
              {"loss": jnp.float32(0.0), "u": jax.random.uniform(rng)})

  cfg = ml_collections.ConfigDict(dict(micro_batches=1, ema_decay=0.0))
  opt = {"model": optax.sgd(1.0)}
  params, state = _start(opt, 1.0)
  fn = jax.jit(step_lib.make_train_step(RngTask(None), opt, cfg, 1))
  key, got = jax.random.key(0), []
  for _ in range(3):
    state, metrics = fn(state, {"x": jnp.zeros(2)}, key, {})
    got.append(float(metrics["u"]))
  want = [float(jax.random.uniform(jax.random.fold_in(key, s)))
          for s in range(3)]
  assert len(set(got)) == 3
  np.testing.assert_allclose(got, want)


def test_the_classifier_loss_is_the_batch_mean_cross_entropy():
  """The demo classifier (the score / fid stages' feature net) trains on the
  mean cross-entropy, stated here as log-sum-exp minus the label's logit, and
  its accuracy metric is the batch's share of argmax hits (a summed loss
  scaled its gradients and clip by the batch size)."""
  from tests import small_run   # pylint: disable=import-outside-toplevel
  task = get_task(small_run.config(1))
  params = task.init_params(jax.random.key(0))["model"]
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((6, 32, 32, 3), np.float32),
           "label": np.array([8, 3, 8, 9, 1, 5], np.int32)}
  _, metrics = task.grads({"model": params}, {}, batch, None, 0)
  logits = np.asarray(task.model.apply({"params": params}, batch["image"]),
                      np.float64)
  logsumexp = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
                     ) + logits.max(-1)
  ce = logsumexp - logits[np.arange(6), batch["label"]]
  np.testing.assert_allclose(metrics["loss"], ce.mean(), rtol=1e-5)
  hits = logits.argmax(-1) == batch["label"]
  assert 0 < hits.sum() < 6, hits   # the share, not a sum or a constant
  np.testing.assert_allclose(metrics["accuracy"], hits.mean(), rtol=1e-6)
