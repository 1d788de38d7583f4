"""The transformer MLP of every model: ``fc1 -> activation -> dropout -> fc2 ->
dropout`` (timm ``Mlp``, HF ``CLIPMLP`` / ``Dinov2MLP``, open_clip's
``c_fc`` / ``c_proj``). Official names are mapped in ``genvis_jax/convert/``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.models import layers

# name -> elementwise function; each says which official code it stands for.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),        # torch nn.GELU()
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),    # GELU('tanh')
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called ``name`` (a key of ``ACTIVATIONS``)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class Mlp(nn.Module):
  """(..., d) -> (..., out or d) through ``hidden`` units.

  Parameters ``fc1`` (d, hidden) and ``fc2`` (hidden, out), logical axes
  embed -> mlp -> embed; dropout after the activation and after ``fc2``.
  """
  hidden: int
  out: int | None = None
  activation: str = "gelu"
  dropout: float = 0.0
  use_bias: bool = True
  kernel_init: Callable = layers.default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(use_bias=self.use_bias, kernel_init=self.kernel_init,
              dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = layers.dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
    h = drop(activation(self.activation)(h))
    h = layers.dense(self.out or x.shape[-1], ("mlp", "embed"), name="fc2",
                     **kw)(h)
    return drop(h)
