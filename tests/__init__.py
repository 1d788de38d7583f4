"""genvis_jax's test suite (``make test``; see the README)."""

# XLA flags of every test process and of the processes the tests start.
# LLVM -O1 instead of the default -O3 for the CPU programs the tests compile:
# most of the suite's time is XLA compiling the init and train-step programs
# of many small models, and -O1 compiles them in about two thirds of the time
# (the sharded init of the Equivariant tokenizer: 25 s -> 14 s; the whole
# suite on 2 cores: 27 -> 19 minutes) with the same HLO passes. Matmuls and
# convolutions run in the same precompiled library kernels either way; speed
# is measured by bench/ at XLA's defaults.
CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=1"


def xla_flags(num_devices: int) -> str:
  """``XLA_FLAGS`` for a test process with ``num_devices`` fake CPU devices."""
  return (f"--xla_force_host_platform_device_count={num_devices} "
          f"{CPU_COMPILE_FLAGS}")
