"""GAN losses for tokenizer training (taming-transformers conventions).

All take discriminator logits of any shape and return float32 scalars (means over
every logit). The discriminator losses carry taming's factor 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import errors


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
  loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
  return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Generator side of the hinge GAN: -mean(fake)."""
  return -jnp.mean(_f32(logits_fake))


def non_saturating_d_loss(logits_real: jax.Array,
                          logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(softplus(-real)) + mean(softplus(fake))) (taming 'vanilla')."""
  loss_real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
  loss_fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
  return 0.5 * (loss_real + loss_fake)


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
  """mean(softplus(-fake)) = -mean(log sigmoid(fake))."""
  return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "non_saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def gan_losses(kind: str):
  """Returns ``(d_loss_fn, g_loss_fn)`` for ``kind`` in D_LOSSES ("hinge",
  "non_saturating"). Raises ``ConfigError`` for another ``kind``."""
  if kind not in D_LOSSES:
    raise errors.ConfigError(
        f"Unknown GAN loss {kind!r}; choose one of "
        f"{sorted(D_LOSSES)}.")
  return D_LOSSES[kind], G_LOSSES[kind]


def gan_active(weight: float, disc_start: int, num_steps: int) -> bool:
  """Whether a run ever trains with its GAN term; logs when it does not.

  False when ``weight`` is 0 or ``disc_start >= num_steps``: such a run can
  leave the discriminator out of its compiled step (same updates, less work).
  """
  active = bool(weight) and int(disc_start) < int(num_steps)
  if not active:
    logging.info("GAN off for this run (weight=%s, disc_start=%s, num_steps=%s):"
                 " the discriminator is not trained.", weight, disc_start,
                 num_steps)
  return active
