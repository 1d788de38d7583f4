"""What each generator task's ``grads`` feeds its model, against the official
training code: RAR's order randomness r(step) and its label dropout, FAR's
class dropout, the Equivariant generator's latents, flow draws (and the
flow target they set), label dropout and RoPE shifts, each in training mode. The models' own tests cover what
the models do with these; a task that dropped no labels (CFG without an
unconditional row), the wrong null class or train=False (no dropout)
passed them. The model's ``__call__`` is intercepted (zero parameters from
shapes, eager): no compile."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.models.eq_generator import EqGenerator
from genvis_jax.models.far import FAR
from genvis_jax.models.rar import RAR
from genvis_jax.train.tasks import eq as eq_task_lib
from genvis_jax.train.tasks import get_task
from tests import test_eq_generator as eq_t
from tests import test_far as far_t
from tests import test_rar as rar_t


def zero_params(task):
  """The task's parameters as zeros, from shapes only (no init compile)."""
  shapes = jax.eval_shape(lambda k: nn.unbox(task.init_params(k)),
                          jax.random.key(0))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def model_inputs(task, params, batch, step, module, output, seed=0, inside=None):
  """(args, seen, metrics) of ``module.__call__`` in ``task.grads``, the model
  answering ``output(*args)`` instead of running; ``seen``: its ``kwargs``
  and ``inside(module, *args)``, evaluated while the module is bound."""
  seen = {}

  def intercept(f, args, kwargs, ctx):
    if isinstance(ctx.module, module) and ctx.method_name == "__call__":
      seen.update(args=[np.asarray(a) for a in args], kwargs=kwargs)
      if inside is not None:
        seen["inside"] = inside(ctx.module, *args)
      return output(*args)
    return f(*args, **kwargs)

  with nn.intercept_methods(intercept):
    _, metrics = task.grads(params, {}, batch, jax.random.key(seed), step)
  assert seen["kwargs"]["train"] is True       # dropout on, as in training
  return seen["args"], seen, metrics


def dropped_to_null(labels, given, null, rate, tol):
  dropped = labels == null
  assert abs(dropped.mean() - rate) < tol, dropped.mean()
  np.testing.assert_array_equal(labels[~dropped], given[~dropped])


# --- RAR ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def rar():
  cfg = rar_t.tiny_config()
  cfg.train.update(num_steps=40, randomness_anneal_start=10,
                   randomness_anneal_end=30, label_dropout=0.1)
  task = get_task(cfg)
  return task, zero_params(task)


def official_ratio(step, start, end):
  """1d-tokenizer utils/train_utils.py get_rar_random_ratio (step 0-based)."""
  if step < start:
    return 1.0
  if step > end:
    return 0.0
  return 1.0 - (step - start) / (end - start)


def _rar_inputs(rar, step, b, seed=0):
  task, params = rar
  rng = np.random.RandomState(seed)
  given = rng.randint(0, rar_t.C, (b,)).astype(np.int32)
  batch = {"tokens": jnp.asarray(rng.randint(0, rar_t.V, (b, rar_t.L)), jnp.int32),
           "label": jnp.asarray(given)}
  (_, labels, orders), _, m = model_inputs(
      task, params, batch, step, RAR,
      lambda t, *_: jnp.zeros((t.shape[0], rar_t.L + 1, rar_t.V)), seed)
  return m, labels, orders, given


@pytest.mark.parametrize("step", [0, 10, 20, 29, 30, 35])
def test_rar_order_randomness_follows_the_official_anneal(rar, step):
  m, _, orders, _ = _rar_inputs(rar, step, b=512, seed=step)
  want = official_ratio(step, 10, 30)
  assert float(m["r"]) == pytest.approx(want, abs=1e-6)
  random = 1 - (orders == np.arange(rar_t.L)).all(1).mean()
  assert random == pytest.approx(want, abs=0.08)


def test_rar_labels_drop_to_the_null_class(rar):
  """Official preprocess_condition: class_label_dropout 0.1 to the class
  past the last (the row sampling's guidance reads)."""
  _, labels, _, given = _rar_inputs(rar, 0, b=2048)
  assert rar[0].model.null_label == rar_t.C
  dropped_to_null(labels, given, rar_t.C, 0.1, 0.025)


# --- FAR ----------------------------------------------------------------------

def test_far_trains_with_class_dropout():
  """FQGAN far_dual.py: LabelEmbedder drops class_dropout_prob 0.1 of the
  labels in training mode, to the class past the last."""
  task = get_task(far_t.tiny_config())
  b = 4096
  batch = {"tokens": jnp.zeros((b, 2 * far_t.N), jnp.int32),
           "label": jnp.full((b,), 3, jnp.int32)}
  # Logits that pick the target of the first sub-token and miss the second's.
  (codes, _), seen, m = model_inputs(
      task, zero_params(task), batch, 0, FAR,
      lambda c, *_: jax.nn.one_hot(c.at[:, 1].add(1), far_t.V),
      inside=lambda module, c, labels: module.class_labels(labels, True))
  assert task.model.class_dropout == 0.1 and task.model.null_label == far_t.C
  used = np.asarray(seen["inside"])
  dropped_to_null(used, np.full(b, 3), far_t.C, 0.1, 0.02)
  assert codes.shape == (b, 2, far_t.N)
  # The logged loss and accuracy are the sub-tokens' means, each also alone.
  first, second = task.names
  assert float(m[f"accuracy_{first}"]) == 1 and float(m[f"accuracy_{second}"]) == 0
  assert float(m["accuracy"]) == 0.5
  assert float(m["loss"]) == pytest.approx(np.log(far_t.V - 1 + np.e) - 0.5, rel=1e-5)


# --- Equivariant generator ------------------------------------------------------

B = 1024


@pytest.fixture(scope="module")
def eq():
  cfg = eq_t.tiny_config()
  cfg.latents.scale = 0.5
  cfg.flow.diffusion_batch_mul = 4
  cfg.flow.shift_num, cfg.flow.shift_group = 16, 64
  cfg.train.label_dropout = 0.1
  task = get_task(cfg)
  return task, zero_params(task)


def _eq_inputs(eq, posterior_noise, seed=0):
  task, params = eq
  task.config.latents.posterior_noise = posterior_noise
  mean = np.asarray(jax.random.normal(jax.random.key(seed), (B, eq_t.L, eq_t.C)))
  given = np.arange(B, dtype=np.int32) % eq_t.K
  args, seen, _ = model_inputs(
      task, params, {"latents": jnp.asarray(mean), "label": jnp.asarray(given)},
      0, EqGenerator, lambda x, l, noise, t: (jnp.zeros_like(noise), None), seed)
  return args, np.asarray(seen["kwargs"]["shift"]), mean, given


def test_eq_latents_are_the_scaled_posterior(eq):
  """engine_generator.py: posterior.sample().mul_(vae_norm), or its mean."""
  (x, *_), _, mean, _ = _eq_inputs(eq, posterior_noise=False)
  np.testing.assert_allclose(x, mean * 0.5, rtol=1e-6)
  (x, *_), _, mean, _ = _eq_inputs(eq, posterior_noise=True)
  per_image = (x / 0.5 - mean).reshape(B, -1).std(1)     # std_i * eps
  assert per_image.mean() > 0.5 and per_image.std() > 0.1


def test_eq_flow_draws_labels_and_shifts(eq):
  """equ_modeling.py: diffusion_batch_mul draws per token (forward_loss's
  repeat), label_drop_prob 0.1 to the fake latent's class, one RoPE shift
  per GPU batch (precompute_freqs_cis: one randint per forward) = per
  flow.shift_group images."""
  (_, labels, noise, t), shift, _, given = _eq_inputs(eq, posterior_noise=False)
  assert noise.shape == (B, 4, eq_t.L, eq_t.C) and t.shape == (B, 4, eq_t.L)
  assert eq[0].model.null_label == eq_t.K
  dropped_to_null(labels, given, eq_t.K, 0.1, 0.03)
  groups = shift.reshape(B // 64, 64)
  assert (groups == groups[:, :1]).all()          # one draw per 64 images
  assert len(set(groups[:, 0].tolist())) > 3      # and a new one per group


def test_the_flow_target_is_noise_minus_data():
  """Rectified flow's velocity target is noise - data (official
  diffusion/flows.py ``target = z1 - z0`` with z1 the noise, z0 the data:
  generator/diffloss.py), the direction the sampler integrates; its
  opposite trained the sampler backwards with every test passing."""
  latents = jnp.ones((1, 2, 3))
  noise = jnp.zeros((1, 1, 2, 3))
  assert float(eq_task_lib.flow_loss(-jnp.ones((1, 1, 2, 3)), noise, latents)) == 0.0
  assert float(eq_task_lib.flow_loss(jnp.ones((1, 1, 2, 3)), noise, latents)) == 4.0


def test_flow_draws_are_uniform_on_t_eps_to_1_per_token():
  """One t per token draw, t = U(0, 1) * (1 - eps) + eps (official
  diffusion/flows.py RectifiedFlow.get_train_tuple: the head sees each
  token separately, so each gets its own t), and standard-normal noise."""
  latents = jnp.zeros((16, 32, 4))
  noise, t = eq_task_lib.flow_targets(latents, jax.random.key(0), 4, t_eps=0.2)
  assert noise.shape == (16, 4, 32, 4) and t.shape == (16, 4, 32)
  t, noise = np.asarray(t), np.asarray(noise)
  assert 0.2 <= t.min() < 0.21 and 0.99 < t.max() < 1.0
  assert abs(t.mean() - 0.6) < 0.02 and len(np.unique(t)) > 0.99 * t.size
  assert abs(noise.mean()) < 0.04 and abs(noise.std() - 1) < 0.03
