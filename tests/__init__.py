"""genvis_jax's test suite (``make test``; see the README)."""

# XLA flags of every test process and of the processes the tests start.
# LLVM -O0 instead of the default -O3 for the CPU programs the tests compile:
# most of the suite's time is XLA compiling the init and train-step programs
# of many small models, with the same HLO passes at every LLVM level. -O1
# compiled them in about two thirds of -O3's time (the sharded init of the
# Equivariant tokenizer: 25 s -> 14 s; the suite on 2 cores: 27 -> 19
# minutes); -O0 cuts another fifth off the largest train step (the
# Equivariant tokenizer's with its DINO discriminator: 45 s -> 36 s) and the
# suite (measured together with the demo data generated once per process)
# from 36.3 to 32.8 CPU-minutes (20:09 -> 18:21 on 2 cores), though a
# few tests that run long element-wise loops take up to 1.4x longer.
# Matmuls and convolutions run in the same precompiled library kernels at
# every level; speed is measured by bench/ at XLA's defaults.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int) -> str:
  """``XLA_FLAGS`` for a test process with ``num_devices`` fake CPU devices."""
  return with_test_flags("", num_devices)


def with_test_flags(flags: str | None, num_devices: int = 8) -> str:
  """``flags`` (the environment's ``XLA_FLAGS``, which a machine image or a
  user may set) with ``num_devices`` fake CPU devices in place of any count
  it sets (the tests are written for 8) and ``CPU_COMPILE_FLAGS`` where it
  sets no optimization level of its own."""
  kept = [f for f in (flags or "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  level = any(f.startswith("--xla_backend_optimization_level") for f in kept)
  return " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"]
                  + ([] if level else [CPU_COMPILE_FLAGS]))


def proc_stat(pid) -> list[str]:
  """``/proc/<pid>/stat``'s fields after the command name (``[0]`` is field
  3, the state; ``[19]`` field 22, the start time). Raises
  ``FileNotFoundError`` for a process that is gone."""
  with open(f"/proc/{int(pid)}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()


def process_running(pid) -> bool:
  """Whether process ``pid`` runs: a zombie (ended, not yet reaped: an
  orphan waits for its reaper, which a container's PID 1 may never be) has
  ended."""
  try:
    return proc_stat(pid)[0] != "Z"
  except (FileNotFoundError, ProcessLookupError):
    return False
