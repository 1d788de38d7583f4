"""Dense softmax attention: the one XLA formula that the model layers
(``models/layers/attention.py``) and the kernels' references
(``windowed_attention/reference.py``) share, with the one mask constant.

Precision, the same on every attention path (dense, banded, KV-cached and
the Pallas kernels): logits, softmax statistics and probabilities in
float32; the probabilities are rounded to the values' dtype for the PV
product, which accumulates in float32 (bf16 operands on the MXU / tensor
cores, as flash attention); the output is cast to ``q.dtype``. In float32
the rounding is exact, so float32 results do not depend on it. The Pallas
kernels' online softmax rounds the weights before normalising them (divides
after the product), so in bf16 they agree with the XLA paths to that
rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" of a masked logit: exp() of it minus any row max
# is exactly 0 in float32, never NaN (a fully masked row gets uniform
# weights, not NaN), and the kernels' running max may start from it.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def weight_values(subscripts: str, probs, v):
  """The PV product ``einsum(subscripts, probs, v)``: float32 ``probs``
  rounded to ``v.dtype``, accumulated in float32. Returns float32."""
  return jnp.einsum(subscripts, probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)


def dot_product_attention(q, k, v, mask=None, *, scale: float = 1.0,
                          dropout: Callable | None = None):
  """Softmax attention.

  Args:
    q: (B, N, H, D); k, v: (B, M, H, D), any float dtype (v's is the PV
      product's operand dtype, see the module docstring).
    mask: bool, broadcastable to (B, H, N, M), True = visible; None: all.
    scale: multiplies the logits (1.0 when q is already scaled).
    dropout: applied to the float32 probabilities (e.g. an ``nn.Dropout``).
  Returns:
    (B, N, H, D) in q.dtype.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k,
                      preferred_element_type=jnp.float32)
  if scale != 1.0:
    logits = logits * scale
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return weight_values("bhnm,bmhd->bnhd", probs, v).astype(q.dtype)
