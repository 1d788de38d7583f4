"""The transformer MLP of every model: ``fc1 -> activation -> dropout -> fc2 ->
dropout`` (timm ``Mlp``, HF ``CLIPMLP`` / ``Dinov2MLP``, open_clip's
``c_fc`` / ``c_proj``), or gated (SwiGLU: LlamaGen / FAR ``FeedForward``
``w1`` / ``w3`` / ``w2``). Official names are mapped in ``genvis_jax/convert/``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype

def _rounded_once(fn):
  """``fn`` computed in float32 and cast back to x's dtype: torch's GELU and
  SiLU kernels compute a bf16 tensor in float32 and round once (in bf16,
  jax's gelu rounds each of its four steps: 35% of outputs differed)."""
  return lambda x: fn(x.astype(jnp.promote_types(x.dtype, jnp.float32))
                      ).astype(x.dtype)


# name -> elementwise function; each says which official code it stands for.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _rounded_once(lambda x: nn.gelu(x, approximate=False)),  # nn.GELU()
    "gelu_tanh": _rounded_once(lambda x: nn.gelu(x, approximate=True)),
    # OpenAI CLIP / HF's x * sigmoid(1.702 x): two ops, each rounded.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": _rounded_once(nn.silu),                          # F.silu
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called ``name`` (a key of ``ACTIVATIONS``): an
  elementwise function, shape and dtype kept. Raises ``ValueError`` for
  another name."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of "
                     f"{sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _dropout(x, rate: float, train: bool):
  """Dropout; no module when ``rate`` is 0, so the active ones keep the
  names (and random streams) ``Dropout_0``, ``Dropout_1`` in call order."""
  return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x


class Mlp(nn.Module):
  """(..., d) -> (..., out or d) through ``hidden`` units.

  Plain: ``fc2(drop(act(fc1 x)))``; ``gated`` (SwiGLU, LlamaGen
  ``FeedForward``): ``fc2(drop(act(fc1_g x) * fc1_x x))`` (timm ``SwiGLU``
  names). Kernels ``fc1*`` (d, hidden) and ``fc2`` (hidden, out), logical
  axes embed -> mlp -> embed. Dropout ``hidden_dropout`` (default
  ``dropout``) after the activation, ``dropout`` after ``fc2``; ``train``
  (Python bool) enables both (rng stream ``"dropout"``). Output in ``dtype``.
  Raises ``ValueError`` for an ``activation`` not in ``ACTIVATIONS``.
  """
  hidden: int
  out: int | None = None
  activation: str = "gelu"
  gated: bool = False
  dropout: float = 0.0
  hidden_dropout: float | None = None
  use_bias: bool = True
  kernel_init: Callable = layers.default_kernel_init
  bias_init: Callable = layers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(use_bias=self.use_bias, kernel_init=self.kernel_init,
              bias_init=self.bias_init, dtype=self.dtype,
              param_dtype=self.param_dtype)
    act = activation(self.activation)
    fc1 = lambda name: layers.dense(self.hidden, ("embed", "mlp"), name=name,
                                    **kw)(x)
    h = act(fc1("fc1_g")) * fc1("fc1_x") if self.gated else act(fc1("fc1"))
    hidden_drop = self.dropout if self.hidden_dropout is None else self.hidden_dropout
    h = _dropout(h, hidden_drop, train)
    h = layers.dense(self.out or x.shape[-1], ("mlp", "embed"), name="fc2",
                     **kw)(h)
    return _dropout(h, self.dropout, train)
