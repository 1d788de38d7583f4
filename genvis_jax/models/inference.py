"""The tokenizer as data-producing modes run it (pretokenize, sample decode).

Paper configs may train a tokenizer in bf16, but its codes and decoded images
are data: they must match the official fp32 models (bf16 LlamaGen / FQGAN codes
differ from fp32 ones at several percent of positions). So those modes build
the tokenizer from ``data_model_config(config.tokenizer)``, whose compute dtype
is ``config.tokenizer.dtype`` (default "float32").
"""

from __future__ import annotations

import ml_collections

from genvis_jax.core import dtypes
from genvis_jax.errors import UserError

def with_compute_dtype(model_config, dtype: str, setting: str
                       ) -> ml_collections.ConfigDict:
  """A copy of ``model_config`` that computes in ``dtype`` ("" keeps its own
  ``dtype``); parameter shapes and ``param_dtype`` are unchanged, so the same
  checkpoint loads.

  Raises:
    ConfigError: ``dtype`` (the value of ``setting``, which the message
      names) is neither '' nor one of ``core.dtypes.FLOAT_DTYPES``.
  """
  dtypes.parse(dtype, setting, hint=", or '' to keep the model config's own "
               "dtype")
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  if dtype:
    cfg.dtype = dtype
  return cfg


def data_model_config(tok) -> ml_collections.ConfigDict:
  """``config.tokenizer`` -> the model config that pretokenize, sample
  decode and the generator tasks (on-the-fly encode, sample grids) build.

  Args:
    tok: ``config.tokenizer`` with ``model`` (a model ConfigDict) and optional
      ``dtype`` (missing: "float32").
  Returns:
    ``with_compute_dtype(tok.model, tok.dtype)``.
  Raises:
    ConfigError: ``tok.dtype`` is neither '' nor a float dtype name.
  """
  return with_compute_dtype(tok.model, tok.get("dtype", "float32"),
                            "config.tokenizer.dtype")


class CodebookSizeError(UserError, ValueError):
  """A generator draws more codes than its tokenizer decodes (or latents of
  another width)."""


def check_codes_fit(config) -> None:
  """Refuses a generator (``config.model.codebook_size``) that can draw codes
  its tokenizer (``config.tokenizer.model.num_codes``) does not have: the
  decode's embedding lookup fills them with NaN (whole images of NaN); and
  a continuous-token generator (``config.model.token_dim``) whose latents
  are not the tokenizer's width (``config.tokenizer.model.embed_dim``).
  Models without the keys pass.

  Raises:
    CodebookSizeError: naming both settings and the fix.
  """
  size = (config.get("model") or {}).get("codebook_size")
  tok = (config.get("tokenizer") or {}).get("model") or {}
  dim, latent = (config.get("model") or {}).get("token_dim"), tok.get("embed_dim")
  if dim and latent and dim != latent:
    raise CodebookSizeError(
        f"config.model.token_dim={dim} differs from the tokenizer's "
        f"config.tokenizer.model.embed_dim={latent}: the generator draws "
        "latents the tokenizer cannot decode. Pass the tokenizer the generator "
        "was trained with, or set both to its latent width.")
  codes = tok.get("num_codes")
  if size and codes and size > codes:
    where = (config.tokenizer.get("config_file") or "")
    raise CodebookSizeError(
        f"config.model.codebook_size={size} is larger than the tokenizer's "
        f"config.tokenizer.model.num_codes={codes}: the generator would draw "
        "codes the tokenizer cannot decode. Pass the tokenizer the generator "
        "was trained with" + (f" (its config: {where})" if where else "") +
        ", or a generator config whose codebook_size fits this tokenizer.")
