"""The floating-point work of a compiled train step and the devices' peak,
for the training log's ``tflops_per_device`` and ``flops_utilization``.

FLOPs are XLA's count (``jax.stages.Lowered.cost_analysis``) of the program
as traced: all the work the devices do, so rematerialised recomputation and
the forward passes of frozen networks (FQGAN's teacher and LPIPS, the
Equivariant generator's tokenizer encode: 92% of ``eq_s:runlocal``'s step)
count (this is the hardware FLOPs utilisation, HFU, not MFU's model FLOPs
of the trained network alone), and a Pallas kernel counts none (XLA does
not look inside a custom call: the Equivariant generator's windowed
attention on TPU / GPU).
"""

from __future__ import annotations

from absl import logging

from genvis_jax import errors

# Dense bf16 matmul peak per jax device, TFLOP/s, by a lower-case substring
# of ``device.device_kind`` (the first that matches): Google Cloud TPU
# system architecture pages (per chip: v2 45, v3 123, two devices each; v4
# 275, v5e 197, v5p 459, v6e 918, one device each) and NVIDIA's data sheets
# (A100 312; H100 / H200 SXM 989, H100 PCIe 756; without sparsity).
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0), ("v3", 61.5), ("v2", 22.5),
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
)


def peak_tflops(device_kind: str, configured: float | None = None
                ) -> float | None:
  """The bf16 peak TFLOP/s of one device: ``configured``
  (``config.train.peak_tflops``) when set, else ``PEAK_TFLOPS``'s entry for
  ``device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3"); None when
  neither knows it (a CPU)."""
  if configured:
    return float(configured)
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def step_flops(step, args, micro_batches: int, num_devices: int
               ) -> float | None:
  """FLOPs one device computes per call of the jitted train ``step`` on
  ``args``: XLA's count of the whole program (``step.lower(*args)``, from
  jit's trace cache: no second trace or compile) over ``num_devices``
  (SPMD: each computes its share). XLA counts a loop's body once, so the
  micro-batch loop's count is taken ``micro_batches`` times (the optimizer
  update after it, a few operations per parameter, is counted that many
  times too). None when the step does not lower here or XLA gives no
  count (logged)."""
  try:
    flops = xla_flops(step.lower(*args))
  except Exception as e:  # pylint: disable=broad-except
    logging.info("The train step's FLOPs are not counted: %s",
                 errors.first_line(e))
    return None
  if flops is None:
    return None
  flops *= max(int(micro_batches), 1) / max(int(num_devices), 1)
  logging.info("The train step computes %.4g GFLOP per device (XLA's count: "
               "frozen networks' forward passes and remat recomputation "
               "included).", flops / 1e9)
  return flops


def xla_flops(program) -> float | None:
  """The FLOPs XLA counts for one call of a lowered or compiled program
  (``cost_analysis``: a dict on new jax, a one-element list on older); None
  where it gives no count."""
  try:
    costs = program.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else None
  flops = float((costs or {}).get("flops", 0.0) or 0.0)
  return flops if flops > 0 else None
