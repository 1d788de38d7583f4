"""The tokenizer as data-producing modes run it (pretokenize, sample decode).

Paper configs may train a tokenizer in bf16, but its codes and decoded images
are data: they must match the official fp32 models (bf16 LlamaGen / FQGAN codes
differ from fp32 ones at several percent of positions). So those modes build
the tokenizer from ``data_model_config(config.tokenizer)``, whose compute dtype
is ``config.tokenizer.dtype`` (default "float32").
"""

from __future__ import annotations

import ml_collections

from genvis_jax.errors import UserError

# "" keeps the tokenizer model config's own dtype.
DATA_DTYPES = ("float32", "bfloat16", "float16", "")


class TokenizerDtypeError(UserError, ValueError):
  """``config.tokenizer.dtype`` names no compute dtype."""


def data_model_config(tok) -> ml_collections.ConfigDict:
  """``config.tokenizer`` -> the model config pretokenize / decode build.

  Args:
    tok: ``config.tokenizer`` with ``model`` (a model ConfigDict) and optional
      ``dtype`` (missing: "float32").
  Returns:
    a copy of ``tok.model`` with ``dtype = tok.dtype`` (parameter shapes and
    ``param_dtype`` unchanged, so the same checkpoint loads).
  Raises:
    TokenizerDtypeError: ``tok.dtype`` is not one of ``DATA_DTYPES``.
  """
  dtype = tok.get("dtype", "float32")
  if dtype not in DATA_DTYPES:
    raise TokenizerDtypeError(
        f"config.tokenizer.dtype={dtype!r} is not a compute dtype; use one of "
        f"{DATA_DTYPES[:-1]}, or '' to keep config.tokenizer.model.dtype.")
  cfg = ml_collections.ConfigDict(tok.model.to_dict())
  if dtype:
    cfg.dtype = dtype
  return cfg
