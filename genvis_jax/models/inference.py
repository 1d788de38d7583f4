"""The tokenizer as data-producing modes run it (pretokenize, sample decode).

Paper configs may train a tokenizer in bf16, but its codes and decoded images
are data: they must match the official fp32 models (bf16 LlamaGen / FQGAN codes
differ from fp32 ones at several percent of positions). So those modes build
the tokenizer from ``data_model_config(config.tokenizer)``, whose compute dtype
is ``config.tokenizer.dtype`` (default "float32").
"""

from __future__ import annotations

import flax.linen as nn
import jax
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


def params_read(fn, params, *args):
  """The part of ``params`` (a nested dict) that ``fn(params, *args)`` reads:
  the leaves its traced program consumes (``jax.make_jaxpr``: traced only,
  on shapes alone if ``params`` / ``args`` are ``ShapeDtypeStruct``s), in
  the same nesting; the others are dropped."""
  flat, tree = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in flat]
  jaxpr = jax.make_jaxpr(lambda p, *a: fn(
      jax.tree_util.tree_unflatten(tree, p), *a))(leaves, *args).jaxpr
  consumed = {id(v) for e in jaxpr.eqns for v in e.invars}
  consumed |= {id(v) for v in jaxpr.outvars}
  out = {}
  for (path, x), var in zip(flat, jaxpr.invars[:len(flat)]):
    if id(var) in consumed:
      node = out
      for k in path[:-1]:
        node = node.setdefault(k.key, {})
      node[path[-1].key] = x
  return out


def decoder_params(tok_model, tok_config, params, *, encode: bool = False):
  """The tokenizer weights ``decode`` reads (``params_read`` on the codes
  ``encode`` gives), with ``encode`` those ``encode`` reads too: sampling
  and a generator's sample grids hold these, not the encoder (FQGAN dual:
  0.16 of 0.56 GiB; the Equivariant tokenizer 0.47 of 0.97; the MaskGIT
  VQGAN 0.12 of 0.20), and the Equivariant generator, which encodes its
  images in the step, not the semantic decoder (0.80 of 0.97 GiB).
  ``params``: arrays, shapes or boxed (``nn.LogicallyPartitioned``)
  leaves; the same kind is returned."""
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  shapes = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(params))
  images = models.example_inputs(tok_config, 1)
  run = lambda method: lambda p, *x: tok_model.apply({"params": p}, *x,
                                                     method=method)
  codes = jax.eval_shape(run("encode"), shapes, *images)
  read = params_read(run("decode"), shapes, codes)
  if encode:
    read = _merged(read, params_read(run("encode"), shapes, *images))
  return _subtree_like(params, read)


def _merged(a: dict, b: dict) -> dict:
  """Nested dicts ``a`` and ``b`` in one (their leaves at the same paths)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _merged(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def _subtree_like(params, like):
  """``params``' leaves at ``like``'s paths (nested dicts)."""
  return {k: _subtree_like(params[k], v) if isinstance(v, dict) else params[k]
          for k, v in like.items()}


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
