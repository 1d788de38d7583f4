"""Multi-host start-up: ``jax.distributed.initialize`` when running on several hosts."""

from __future__ import annotations

import os

import jax
from absl import logging

from genvis_jax import errors


def maybe_initialize() -> None:
  """Initialises the distributed runtime on TPU pods / multi-process runs.

  On a TPU VM slice, and across the slices of a multislice job
  (``MEGASCALE_NUM_SLICES`` > 1), jax discovers the peers itself. For
  multi-process CPU/GPU runs set ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Single-host runs do nothing.

  Raises:
    ConfigError: ``JAX_COORDINATOR_ADDRESS`` is set and the process count or
      id is missing, not an integer, or not 0 <= id < count.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        **process_settings(os.environ))
  elif (os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
        or _num_slices(os.environ) > 1):
    # A pod slice's workers, or several slices (multislice: one host each
    # has a single worker name); jax reads the MEGASCALE_* settings itself.
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def _num_slices(env) -> int:
  """``MEGASCALE_NUM_SLICES`` (set on the hosts of a multislice TPU job), 1
  when unset or not a number."""
  try:
    return int(env.get("MEGASCALE_NUM_SLICES", ""))
  except ValueError:
    return 1


def process_settings(env) -> dict:
  """``num_processes`` / ``process_id`` from ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID`` in ``env``, checked (see ``maybe_initialize``)."""
  values = {}
  for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    try:
      values[key] = int(env.get(key, ""))
    except ValueError:
      values[key] = None
  count, index = values["JAX_NUM_PROCESSES"], values["JAX_PROCESS_ID"]
  if count is None or index is None or count < 1 or not 0 <= index < count:
    raise errors.ConfigError(
        f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} starts a "
        f"multi-process run, which also needs JAX_NUM_PROCESSES (the number "
        f"of processes, >= 1) and JAX_PROCESS_ID (this one's, 0 .. count - "
        f"1); got JAX_NUM_PROCESSES={env.get('JAX_NUM_PROCESSES')!r}, "
        f"JAX_PROCESS_ID={env.get('JAX_PROCESS_ID')!r}. Set both on every "
        f"process, or unset JAX_COORDINATOR_ADDRESS for one process.")
  return {"num_processes": count, "process_id": index}
