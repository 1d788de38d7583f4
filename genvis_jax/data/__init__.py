"""Grain input pipelines: demo data, image folders, TFDS, pre-tokenized files.

Entry point: ``create_dataset(config.data, split=..., global_batch_size=...,
seed=...)`` -> ``(iterator, info)``; see ``pipeline.py``.

Names below load their module on first use, so a module that needs no Grain
(``sources``: the data-source checks a trainer runs at setup) imports on a
machine without Grain / TensorFlow (the accelerator machine).
"""

import importlib

_EXPORTS = {
    "demo": ("DemoSource", "demo_landscapes", "demo_shapes"),
    "pipeline": ("PipelineInfo", "create_dataset", "make_source"),
    "sources": ("DataNotFoundError", "ImageFolderSource"),
    "tfds_source": ("TfdsSource",),
    "tokens": ("TokenFileError", "TokenSource", "TokenWriter",
               "find_token_files", "token_files_exist", "write_token_records"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items()
              for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
  if name in _MODULE_OF:
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"),
                   name)
  try:   # a submodule not imported yet (``data.tokens``)
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":   # the submodule's own import failed
      raise
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}") from None
