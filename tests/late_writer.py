"""``python -m genvis_jax.main`` as one process of a multi-process job in
which process 0 writes its last output ``DELAY`` seconds late, and every
other process checks, as its mode returns, that the output is there: a
process that left while process 0 was still writing would wait at
``jax.distributed``'s shutdown barrier, which stops the job after 5 minutes
(sampling's ``samples.npz`` of a 50k set, a pre-tokenizing shard).

  python tests/late_writer.py OUTPUT DELAY --config=... --workdir=... ...
"""

import os
import runpy
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top

from genvis_jax import modes  # pylint: disable=g-import-not-at-top
from genvis_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
from genvis_jax.sample import parts  # pylint: disable=g-import-not-at-top

output, delay = sys.argv[1], float(sys.argv[2])


def _late(fn):
  def wrapped(*args, **kwargs):
    if jax.process_index() == 0:
      time.sleep(delay)
    return fn(*args, **kwargs)
  return wrapped


parts._write_samples = _late(parts._write_samples)  # pylint: disable=protected-access
pretokenize._write_shard = _late(pretokenize._write_shard)  # pylint: disable=protected-access
_run = modes.run


def _run_then_check(*args, **kwargs):
  out = _run(*args, **kwargs)
  if not os.path.exists(output):
    print(f"process {jax.process_index()} returned before {output} was "
          "written", flush=True)
    os._exit(3)  # pylint: disable=protected-access
  return out


modes.run = _run_then_check
sys.argv = ["genvis_jax.main"] + sys.argv[3:]
runpy.run_module("genvis_jax.main", run_name="__main__")
