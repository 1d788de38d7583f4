"""Custom kernels (Pallas TPU / GPU) with pure-JAX references.

``windowed_attention``: windowed causal self-attention over image columns
(Equivariant image modeling generator).
``attention``: the dense softmax attention (one formula, one mask value, one
precision) that the model layers and the kernels' references share.
"""

from genvis_jax.kernels.windowed_attention import windowed_causal_attention

__all__ = ["windowed_causal_attention"]
