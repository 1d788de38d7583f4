"""The programs jax compiles inside a block, from its compile log."""

import contextlib
import logging

import jax


@contextlib.contextmanager
def compiled(caplog):
  """``with compiled(caplog) as names:`` fills ``names`` with the programs
  compiled inside the block (``"jit(decode_float)"`` ...), in order."""
  names = []
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, "jax"):
    start = len(caplog.records)
    yield names
    names.extend(r.getMessage().split()[1] for r in caplog.records[start:]
                 if r.getMessage().startswith("Compiling "))
