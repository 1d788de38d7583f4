"""Config strings -> code: one convention for every registry.

A config string names a module (as big_vision's ``config.model_name``):
``config.model.name = "rar"`` is ``genvis_jax.models.rar``, ``config.task =
"rar"`` is ``genvis_jax.train.tasks.rar``, ``--kind=rar`` is
``genvis_jax.convert.rar``, ``config.evaluate.kind = "generation"`` is
``genvis_jax.evaluate.generation``. The module exposes the names its registry
agrees on (models: ``build`` and ``example_inputs``; tasks: ``TASK``;
converters: ``convert`` ...). Adding a family is adding its files; the only
tables that name families hold facts about the official pipelines each
follows, where a new family without an entry gets a message naming the
setting to give instead: the tokenizers' uint8 conversion
(``sample.images.DEFAULT_UINT8``, else ``config.tokenizer.uint8``) and
evaluation protocol (``evaluate.protocols.PROTOCOLS``), the converters'
download commands (``convert.SOURCES``), and the paper config a demo's
generator shrinks (``modes.PAPER_RUNLOCAL``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType
from typing import Sequence

from absl import logging

from genvis_jax.errors import ConfigError

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def available(package: str, attrs: Sequence[str] = ()) -> list[str]:
  """Names of ``package``'s modules that define every one of ``attrs``.

  Imports each candidate module (only to list choices in an error message).
  """
  pkg = importlib.import_module(package)
  names = []
  for info in pkgutil.iter_modules(pkg.__path__):
    if info.name.startswith("_"):
      continue
    try:
      mod = importlib.import_module(f"{package}.{info.name}")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("%s.%s cannot be imported (%s: %s); it is left out of "
                      "the choices.", package, info.name, type(e).__name__, e)
      continue
    if all(hasattr(mod, a) for a in attrs):
      names.append(info.name)
  return sorted(names)


def module(package: str, name: str, attrs: Sequence[str] = (), *,
           setting: str = "the name") -> ModuleType:
  """``{package}.{name}``, checked to define ``attrs``.

  ``setting`` is the config key the name came from (for the messages).
  Raises ``ConfigError`` naming the choices when ``name`` is not a module of
  ``package`` or lacks one of ``attrs``. Errors raised while importing an
  existing module propagate unchanged.
  """
  full = f"{package}.{name}"
  if not isinstance(name, str) or not _NAME.match(name):
    raise ConfigError(f"{setting}={name!r} is not a module name; choose one of "
                      f"{available(package, attrs)}.")
  try:
    mod = importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name != full:
      raise
    raise ConfigError(f"Unknown {setting}={name!r} (no module {full}); choose "
                      f"one of {available(package, attrs)}.") from None
  missing = [a for a in attrs if not hasattr(mod, a)]
  if missing:
    raise ConfigError(f"{setting}={name!r}: module {full} does not define "
                      f"{missing}; choose one of {available(package, attrs)}.")
  return mod


def function(spec: str):
  """``"package.module:function"`` -> the function (imported on use)."""
  mod, _, fn = spec.partition(":")
  if not fn:
    raise ConfigError(f"{spec!r} is not of the form 'package.module:function'.")
  return getattr(importlib.import_module(mod), fn)
