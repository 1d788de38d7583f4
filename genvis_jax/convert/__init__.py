"""Official PyTorch checkpoints -> Flax parameters (rename + transpose, checked),
and the one reader of every weight file.

  params = from_torch("rar", state_dict, config.model)
  python -m genvis_jax.convert --kind=rar --src=rar_b.bin \
      --config=configs/rar_b.py --dst=/ckpt/rar_b
  params = load_weights(path, expected, convert=lpips.convert)

``state_dict`` maps official key names to numpy arrays (``io.load_state_dict``
reads .bin/.pt/.pth/.ckpt without torch, .safetensors and .npz). Every result is
checked against the parameters the kind expects (by default
``models.param_shapes(model_config)``): a checkpoint that does
not fit raises one ``CheckpointMismatchError`` listing the missing, unexpected
and mis-shaped keys, and nothing is written.

A kind is a module of this package named by ``--kind`` (see
``genvis_jax.core.registry``) that defines ``convert(state_dict, model_config)
-> params`` and, where the defaults do not fit, ``expected(model_config)``
(abstract params), ``write(dst, params, state_dict)`` (default: an Orbax
``params`` directory), ``NEEDS_CONFIG = False`` (kinds of one fixed
architecture), ``CONFIG_FORM`` (the ``--config`` a kind takes, when not a
``configs/`` file) and ``ADVICE`` (what to check when a file does not fit,
when not the config). A kind named like a model (``config.model.name``:
rar, maskgit_vqgan, ...) converts that model's weights only. Adding a kind
is adding its file.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from genvis_jax import errors, models
from genvis_jax.convert import io, tree
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import registry
from genvis_jax.core import weights as weights_lib
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError, compare_trees
from genvis_jax.core.param_checkpoint import RECORDS, REPLACED, STAGING

__all__ = ["kind_module", "kinds", "from_torch", "convert_file", "load_weights",
           "CheckpointMismatchError"]


def kind_module(kind: str) -> ModuleType:
  """``genvis_jax/convert/<kind>.py``; ``ConfigError`` naming the kinds when
  there is no such converter."""
  return registry.module(__name__, kind, ("convert",), setting="--kind")


def kinds() -> list[str]:
  """Every conversion kind (the modules here that define ``convert``)."""
  return registry.available(__name__, ("convert",))


def module_shapes(module, *inputs):
  """Abstract (ShapeDtypeStruct) params of a Flax ``module`` initialised on
  ``inputs`` (kinds of a fixed architecture: their ``expected``)."""
  return jax.eval_shape(lambda r: nn.unbox(module.init(r, *inputs)["params"]),
                        jax.random.key(0))




def check_kind(kind: str, model_config, config=None):
  """Refuses a ``model_config`` that ``kind`` cannot fit: none where the kind
  needs one, or another model's (``--kind=maskgit_vqgan`` with a RAR config)
  whose ``name`` is itself a kind. ``config`` (the whole config) lets the
  message name the config file of its tokenizer. Raises ``ConfigError``."""
  mod = kind_module(kind)
  form = getattr(mod, "CONFIG_FORM", "configs/X.py")
  needs = getattr(mod, "NEEDS_CONFIG", True)
  if needs and model_config is None:
    raise errors.ConfigError(f"Kind {kind!r} needs the model config the "
                             f"checkpoint must fit (--config={form}).")
  if not needs and model_config is not None:
    raise errors.ConfigError(f"Kind {kind!r} is one fixed architecture and "
                             "takes no --config: leave it out.")
  name = getattr(model_config, "get", lambda *_: None)("name")
  if name and name != kind and name in kinds():
    tokenizer = (config or {}).get("tokenizer") or {}
    if (tokenizer.get("model") or {}).get("name") == kind and tokenizer.get(
        "config_file"):
      hint = (f"this config's tokenizer is {kind!r}: convert it with "
              f"--config={tokenizer.config_file}")
    elif hasattr(mod, "CONFIG_FORM"):
      hint = f"pass --config={form}"
    else:
      hint = (f"pass the config of the {kind!r} model the checkpoint was "
              f"released for, or --kind={name} if the file holds {name!r} "
              "weights")
    raise errors.ConfigError(
        f"--kind={kind} converts {kind!r} weights, but the --config model is "
        f"{name!r}: {hint}.")


def from_torch(kind: str, state_dict: dict[str, Any], model_config) -> dict:
  """Official ``{name: array}`` -> Flax params of ``kind`` fitting ``model_config``.

  Returns numpy leaves (possibly transposed views) in the model's parameter
  dtypes; ``jax.device_put`` them before ``apply``. Raises ``ConfigError``
  (``check_kind``) and ``CheckpointMismatchError`` (missing / unexpected /
  mis-shaped keys, in Flax naming; unrecognised official keys keep their
  official name).
  """
  mod = kind_module(kind)
  check_kind(kind, model_config)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  params = mod.convert(state_dict, model_config)
  expected = getattr(mod, "expected", models.param_shapes)(model_config)
  try:
    return _fit(expected, params, f"The {kind!r} checkpoint",
                "i.e. the config of the model the checkpoint was released for",
                getattr(mod, "ADVICE", None))
  except CheckpointMismatchError as e:
    first = {k.split(".", 1)[0] for k in state_dict if "." in k}
    if len(first) == 1 and len(state_dict) > 1 and all("." in k
                                                       for k in state_dict):
      prefix = f"{first.pop()}."
      e.args = (f"{e.args[0]}\nEvery key of the file starts with {prefix!r}: "
                "a training wrapper's name (e.g. a LightningModule's "
                "attribute)? Save the wrapped model's own state_dict, or "
                "choose the entry holding it with --key.",) + e.args[1:]
    raise


def _fit(expected, params, what: str,
         fix: str = "or convert the released weights again",
         advice: str | None = None):
  compare_trees(expected, params, what, fix, advice)
  return jax.tree_util.tree_map(
      lambda e, p: np.asarray(p).astype(e.dtype, copy=False), expected, params)


def _check_dst(dst: str, overwrite: bool, folder: bool = True) -> None:
  """Refuses a ``dst`` with something in it (unless ``overwrite``), a file
  where a kind writes a ``folder``, and a training run's workdir (its
  checkpoints would be hidden behind the converted ``params``, not
  replaced)."""
  if not dst:
    raise errors.ConfigError("--dst is required (where to write the converted weights).")
  full = os.fspath(dst)
  target = epath.Path(full)   # local or gs://
  if not folder and not full.endswith(".npz"):   # before --src is read
    raise errors.ConfigError(
        f"--dst={full}: this kind writes one .npz file; end --dst in .npz.")
  if folder and target.is_file():
    raise errors.OutputExistsError(
        f"--dst={full} is a file; this kind writes a folder (a parameter "
        "checkpoint): choose another --dst.")
  if target.is_dir() and (target / "checkpoints").exists():
    raise errors.OutputExistsError(
        f"--dst={full} is a training run's workdir (it holds checkpoints/); "
        "converted weights written there would hide its checkpoints from "
        "init_from: choose another --dst.")
  held = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
  if (target.is_file() or held) and not overwrite:
    # Only what a conversion writes, or a replacement stopped part-way
    # (whatever else the folder holds).
    unfinished = held and "params" not in held and (
        STAGING in held or REPLACED in held or all(
            n.startswith(("params.orbax-checkpoint-tmp", STAGING, REPLACED)
                         + RECORDS) for n in held))
    kept = (f" The weights it was replacing are in {full}/{REPLACED}/params."
            if REPLACED in held else "")
    raise errors.OutputExistsError(
        f"{full} holds an unfinished conversion ({', '.join(held)}: the "
        "write stopped before the weights were whole); pass --overwrite to "
        f"write it again.{kept}" if unfinished else
        f"{full} exists and is not empty; pass --overwrite to replace it, or "
        "choose another --dst.")
  _check_writable(full)


def _check_writable(dst: str) -> None:
  """Refuses a local ``dst`` whose nearest existing folder cannot be written
  (read-only, not ours) before ``--src`` is read and converted: the write
  failed after that, with a traceback."""
  if files.is_remote(dst):
    return
  folder = os.path.abspath(dst)
  while not os.path.isdir(folder):
    folder = os.path.dirname(folder)
  if not os.access(folder, os.W_OK | os.X_OK):
    raise errors.OutputWriteError(
        f"Cannot write --dst={dst}: {folder} is not writable (read-only or "
        "not yours). Choose a writable --dst.")


def _read_state_dict(path: str, key: str | None = None,
                     setting: str = "--src") -> dict:
  """``io.load_state_dict`` of a local or ``gs://`` file (read from a local
  copy, ``files.local_copy``); its errors name ``path``, not the copy."""
  if files.is_remote(path) and not epath.Path(path).exists():
    raise errors.CheckpointFileNotFoundError(
        f"Weights file {path} not found; check the path ({setting}).")
  with files.local_copy(path) as local:
    try:
      return io.load_state_dict(local, key, setting=setting)
    except errors.UserError as e:
      if local != path:
        e.args = tuple(a.replace(local, path) if isinstance(a, str) else a
                       for a in e.args)
      raise


# How to fetch each kind's official files (the commands of the README's
# "Where the files come from"), named when --src is missing.
SOURCES = {
    "rar": "hf download yucornetto/RAR rar_b.bin --local-dir weights",
    "maskgit_vqgan": "hf download fun-research/TiTok "
                     "maskgit-vqgan-imagenet-f16-256.bin --local-dir weights",
    "llamagen_vq": "hf download FoundationVision/LlamaGen vq_ds16_c2i.pt "
                   "--local-dir weights",
    "fqgan": "hf download showlab/FQGAN fqgan_dual_ds16.pt --local-dir weights",
    "eq_tokenizer": "hf download UmiSonoda16/EquivariantModeling "
                    "tokenizer.ckpt places_large.ckpt --local-dir weights",
    "clip_vision": "hf download openai/clip-vit-large-patch14 "
                   "model.safetensors --local-dir weights/clip-vit-large-patch14",
    "dinov2": "hf download facebook/dinov2-base model.safetensors "
              "--local-dir weights/dinov2-base",
    "inception": "curl -L -o weights/pt_inception-2015-12-05-6726825d.pth "
                 "https://github.com/mseitzer/pytorch-fid/releases/download/"
                 "fid_weights/pt_inception-2015-12-05-6726825d.pth",
    # Two files: torchvision's VGG16 and the LPIPS linear layers.
    "lpips": "curl -L -o weights/vgg16-397923af.pth https://download.pytorch."
             "org/models/vgg16-397923af.pth && curl -L -o weights/vgg.pth "
             "https://github.com/richzhang/PerceptualSimilarity/raw/master/"
             "lpips/weights/v0.1/vgg.pth",
}
SOURCES["eq_generator"] = SOURCES["eq_tokenizer"]


def _missing_source(kind: str, error: errors.CheckpointFileNotFoundError):
  """``error`` with where ``kind``'s official files come from."""
  how = (f"e.g. `{SOURCES[kind]}`; " if kind in SOURCES else "")
  return errors.CheckpointFileNotFoundError(
      f"{error} The official {kind} weights: {how}README.md, \"Where the "
      "files come from\".")


def source_paths(src: str | Sequence[str]) -> list[str]:
  """``--src``'s files: a comma-separated string or a list, empties dropped."""
  return [p for p in (src.split(",") if isinstance(src, str) else src) if p]


def load_sources(src: str | Sequence[str], key: str | None = None) -> dict:
  """Reads and merges one or more files (a comma-separated string or a list)."""
  paths = source_paths(src)
  if not paths:
    raise errors.ConfigError("--src is required (the official checkpoint file).")
  state: dict = {}
  for path in paths:
    part = _read_state_dict(path, key)
    clash = sorted(set(part) & set(state))
    if clash:
      raise errors.ConfigError(
          f"{path} repeats keys of an earlier --src file: {clash[:10]}.")
    state.update(part)
  return state


def convert_file(kind: str, src: str | Sequence[str], model_config, dst: str, *,
                 key: str | None = None, overwrite: bool = False,
                 config=None) -> dict:
  """Reads ``src``, converts and checks it, then writes ``dst``; returns params.

  Models go to a parameter-only Orbax checkpoint ``dst/params`` (read by
  ``init_from``), with ``config`` (the whole config whose ``model`` is
  ``model_config``) recorded beside it: sampling the weights with other model
  settings is then refused by name, as for a training run. Kinds with their
  own ``write`` (teachers, LPIPS: one ``.npz``) record none. Nothing is
  written unless the checkpoint fits; a non-empty ``dst`` is refused unless
  ``overwrite``.
  """
  mod = kind_module(kind)
  check_kind(kind, model_config, config)
  _check_dst(dst, overwrite, folder=not hasattr(mod, "write"))
  try:
    state = load_sources(src, key)
  except errors.CheckpointFileNotFoundError as e:
    raise _missing_source(kind, e) from None
  params = from_torch(kind, state, model_config)
  try:
    if hasattr(mod, "write"):
      mod.write(dst, params, state)
    else:
      weights_lib.save_params(dst, params, config,
                              source=_source_record(src, key))
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Orbax / TensorStore report a full disk in a ValueError, deep inside.
    raise errors.OutputWriteError(
        f"Could not write the converted weights to {dst}: "
        f"{ckpt_lib.save_error_cause(e)}. Weights already there are kept. "
        "Free space (or fix the folder) and run the same command with "
        "--overwrite.") from e
  return params


def _source_record(src, key) -> dict:
  """What a conversion read: each ``--src`` file's path, bytes and SHA-256,
  and ``--key`` (recorded beside the weights: which official file they
  are)."""
  return {"key": key, "files": [
      {"path": os.path.abspath(p) if not files.is_remote(p) else p,
       "bytes": epath.Path(p).stat().length,
       "sha256": files.file_sha256(p)} for p in source_paths(src)]}


def load_weights(path: str, expected=None, *,
                convert: Callable[[dict], Any] | None = None,
                setting: str = "the weights path",
                what: str = "weights",
                fetch: str = "Convert the released weights with `python -m "
                "genvis_jax.convert --kind=KIND` (its --help lists the kinds)",
                model_name: str = "") -> dict:
  """Weights from a local ``path``, checked against ``expected`` (abstract
  params, e.g. ``jax.eval_shape`` of an init; None: the caller checks them by
  applying its module): the one reader of weight files.

  ``path`` is an Orbax ``params`` directory (what ``python -m
  genvis_jax.convert`` writes for models), an ``.npz`` in Flax layout (keys
  ``"a/b/kernel"``, what it writes for teachers), or a file with
  the official names (``.pth`` / ``.bin`` / ``.safetensors`` / ``.npz``),
  turned into Flax params by ``convert(state_dict)`` (e.g. a kind's
  ``convert`` with its model config bound). Nothing is downloaded. A
  training workdir of a model other than ``model_name`` is refused naming
  both (``core.weights.restore_params``). Returns
  jax arrays in ``expected``'s dtypes. ``setting`` names the config key the
  path came from, ``what`` the weights, ``fetch`` how to get them (all for
  the messages). Raises ``CheckpointFileNotFoundError`` (nothing there),
  ``CheckpointFileError`` (unreadable file, or official names without a
  ``convert``) and ``CheckpointMismatchError`` (other names or shapes). On
  a multi-process job every process calls it (a directory is read on all,
  its outcome agreed: ``core.weights.restore_params``).
  """
  # Process 0's view: every process then takes the same path (a directory
  # is read with collectives, a file without).
  if multihost.decided_on_process_0(lambda: epath.Path(path).is_dir()):
    if expected is None:
      raise errors.CheckpointFileError(
          f"{path} ({setting}) is a directory; these {what} are read from one "
          "file (.npz / .pth / .bin / .safetensors).")
    # restore_params gives host arrays (expected names no sharding).
    return jax.device_put(weights_lib.restore_params(
        path, expected, setting=setting, model_name=model_name))
  if not epath.Path(path).exists():
    raise errors.CheckpointFileNotFoundError(
        f"No {what} at {path!r} ({setting}): file not found. {fetch} and "
        f"point {setting} at it.")
  flat = _read_state_dict(path, setting=setting)
  if not flat:
    raise errors.CheckpointFileError(f"{path} ({setting}) holds no arrays.")
  if all("/" in k for k in flat):   # Flax paths; official names use dots
    params = tree.nest(flat)
  elif convert is not None:
    params = convert({k: np.asarray(v) for k, v in flat.items()})
    if not jax.tree_util.tree_leaves(params):   # it recognised no name
      raise errors.CheckpointFileError(
          f"{path} ({setting}) holds {len(flat)} arrays, none of them "
          f"{what} (e.g. {next(iter(flat))!r}): another model's file? {fetch} "
          f"and point {setting} at it.")
  else:
    raise errors.CheckpointFileError(
        f"{path} ({setting}) holds official names (e.g. {next(iter(flat))!r}) "
        "but no converter applies here: convert it with `python -m "
        "genvis_jax.convert` first.")
  if expected is not None:
    params = _fit(expected, params, f"{what[:1].upper()}{what[1:]} {path} "
                  f"({setting})")
  # One transfer of the tree, in jax's dtypes: an eager jnp.asarray per leaf
  # compiled a program per distinct shape (55 for Inception's 472 arrays).
  return jax.device_put(params)
