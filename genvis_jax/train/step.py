"""The jitted train step: gradient accumulation, optimizer updates, EMA, NaN guard."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from genvis_jax.models import quantizers
from genvis_jax.train.state import TrainState


def split_micro_batches(batch, k: int, num_shards: int):
  """(B, ...) -> (k, B // k, ...) where micro-batch i takes the i-th slice of
  every data-parallel shard, so no example moves between devices."""
  def f(x):
    b = x.shape[0]
    per = b // (num_shards * k)
    y = x.reshape(num_shards, k, per, *x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    return y.reshape(k, b // k, *x.shape[1:])
  return jax.tree_util.tree_map(f, batch)


def accumulate_grads(grads_fn, params, batch, rng, step, k: int, num_shards: int):
  """Mean of ``grads_fn`` over ``k`` equal micro-batches (a scan; one compile).
  Micro-batch i draws with ``fold_in(rng, i)``: its random numbers (RAR
  orders, label dropout) are not the full batch's rows of them, so the mean
  equals the full-batch gradient in expectation; with nothing random, up to
  float rounding."""
  if k == 1:
    return grads_fn(params, batch, rng, step)
  micro = split_micro_batches(batch, k, num_shards)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  zeros = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(grads_fn, params, first, rng, step))

  def body(acc, inputs):
    i, mb = inputs
    out = grads_fn(params, mb, jax.random.fold_in(rng, i), step)
    return jax.tree_util.tree_map(jnp.add, acc, out), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
  return jax.tree_util.tree_map(lambda x: x / k, total)


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay of the update made at 0-based ``step`` (int, may be traced),
  float32. ``warmup``: ``min(decay, (1 + n) / (10 + n))`` with n = step + 1 the
  update count, as ``LitEma(use_num_upates=True)`` (taming / latent-diffusion
  ``ema.py``, used by the Equivariant tokenizer) does; otherwise ``decay``."""
  if not warmup:
    return jnp.float32(decay)
  n = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def make_train_step(task, optimizers, train_config, num_shards: int):
  """Returns ``step_fn(state, batch, rng, frozen) -> (state, metrics)``
  (un-jitted); ``frozen``: the parameters the loss reads and no optimizer
  updates (e.g. LPIPS, a tokenizer).

  The per-step key is ``fold_in(rng, state.step)`` so a resumed run draws
  the same numbers. Groups are updated in ``task.update_phases`` (default:
  all at once); phase i > 0 draws with ``fold_in(step key, i)``. A non-finite
  loss or gradient leaves the float state (params, moments, EMA) untouched,
  advances the step and the optimizer's counts, and is reported as
  ``metrics["nonfinite"] = 1`` (the loop stops with a clear error when
  ``train.check_finite``, else counts it; see train/guard.py), with
  ``metrics["nonfinite/<group>"] = 1`` for each group whose gradients were
  NaN/Inf, and every other float metric of that step 0: a log interval's
  means are over its finite steps (``interval_means``), where one skipped
  step's NaN made the whole interval's loss and gradient norms NaN.
  """
  k = int(train_config.micro_batches)
  ema_decay = float(train_config.ema_decay)
  ema_warmup = bool(train_config.get("ema_warmup", False))
  phases = task.update_phases or (tuple(task.param_groups),)

  def step_fn(state: TrainState, batch, rng, frozen):
    step_rng = jax.random.fold_in(rng, state.step)
    new_params, new_opt = dict(state.params), dict(state.opt_state)
    metrics = {}
    for i, groups in enumerate(phases):
      # Frozen groups (e.g. LPIPS weights) are read by the loss, never updated.
      kw = {} if task.update_phases is None else {"groups": groups}
      grads, phase_metrics = accumulate_grads(
          lambda p, *a, kw=kw: task.grads(p, frozen, *a, **kw), new_params,
          batch, step_rng if i == 0 else jax.random.fold_in(step_rng, i),
          state.step, k, num_shards)
      metrics.update(phase_metrics)
      for g in groups:
        updates, new_opt[g] = optimizers[g].update(
            grads[g], state.opt_state[g], new_params[g])
        new_params[g] = optax.apply_updates(new_params[g], updates)
        metrics[f"grad_norm/{g}"] = optax.tree.norm(grads[g])
    ema = state.ema
    if ema is not None:
      decay = ema_decay_at(state.step, ema_decay, ema_warmup)
      ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p,
                                   ema, new_params[task.ema_group])
    finite_grads = {g: jnp.isfinite(metrics[f"grad_norm/{g}"])
                    for g in task.param_groups}
    finite = jnp.isfinite(metrics["loss"])
    for g in task.param_groups:
      finite &= finite_grads[g]
    new_state = TrainState(step=state.step + 1, params=new_params,
                           opt_state=new_opt, ema=ema)
    # Keep the last good parameters, moments and EMA when the loss or
    # gradients are NaN/Inf. Integer leaves (the step, optax's schedule and
    # bias-correction counts) advance anyway, so the learning rate stays the
    # schedule's value at state.step, which RAR's order annealing also reads.
    new_state = jax.tree_util.tree_map(
        lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer)
        else jnp.where(finite, n, o), new_state, state)
    # Zeroed after the histograms become usage / perplexity (an all-zero
    # histogram has perplexity 1, which the interval's mean would count).
    metrics = {k: jnp.where(finite, v, jnp.zeros_like(v))
               if jnp.issubdtype(v.dtype, jnp.floating) else v
               for k, v in usage_of_batch(metrics).items()}
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    metrics.update({f"nonfinite/{g}": 1.0 - f.astype(jnp.float32)
                    for g, f in finite_grads.items()})
    return new_state, metrics

  return step_fn


def interval_means(sums: dict, count: int) -> dict:
  """A log interval's means from the sums of ``count`` steps' metrics:
  ``nonfinite`` and ``nonfinite/<group>`` (fractions of the steps), the
  others over the finite steps alone (``make_train_step`` zeroes a skipped
  step's), NaN where every step was skipped."""
  good = count - round(float(sums.get("nonfinite", 0.0)))
  return {k: float(v) / count if k.split("/")[0] == "nonfinite"
          else float(v) / good if good else float("nan")
          for k, v in sums.items()}


def usage_of_batch(metrics: dict) -> dict:
  """``metrics`` with each code histogram (``code_counts[/b]``, float
  (num_codes,): a mean over micro-batches) replaced by the codebook usage
  and perplexity of the whole batch (``usage[/b]``, ``perplexity[/b]``;
  unsuffixed ones the mean over sub-codebooks where only per-branch
  histograms exist). The quantizers' own per-micro-batch values, averaged,
  fell as micro_batches grew at the same global batch (fewer tokens each)."""
  counts_key = quantizers.COUNTS
  out = {k: v for k, v in metrics.items() if not k.startswith(counts_key)}
  branches = []
  for key, counts in metrics.items():
    if key.startswith(counts_key):
      suffix = key[len(counts_key):]
      out.update({name + suffix: v for name, v in
                  quantizers.usage_from_counts(counts).items()})
      branches += [suffix] if suffix else []
  if branches and counts_key not in metrics:
    for name in ("usage", "perplexity"):
      out[name] = sum(out[name + b] for b in branches) / len(branches)
  return out


def jit_train_step(step_fn, state_shardings, batch_sharding, replicated,
                   frozen_shardings=None):
  """``step_fn(state, batch, rng, frozen) -> (state, metrics)`` compiled
  with the state donated (updated in place: one copy of the weights and
  optimizer state in device memory, not two) and placed on
  ``state_shardings``, the batch on ``batch_sharding``, the frozen
  parameters on ``frozen_shardings`` (``state.frozen_shardings``; default
  replicated), the key and the metrics replicated."""
  return jax.jit(step_fn, donate_argnums=(0,),
                 in_shardings=(state_shardings, batch_sharding, replicated,
                               frozen_shardings or replicated),
                 out_shardings=(state_shardings, replicated))
