"""What a training log step writes: the interval's scalars to TensorBoard
(process 0's clu writer), ``on_log`` and one console line, with the counts
that take every process (``skipped_records``)."""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import multihost


def skipped_records(info, group=None) -> int:
  """Distinct unreadable files of the whole job: each data group's
  (``sharding.data_groups``: processes of one group read one shard, so
  their counts are the same files) summed once. A collective: every process
  calls it at the same step (all log at the same steps). ``group``: this
  process's ``(group, count)``; None: one group per process."""
  counts = multihost.gather_ints(info.num_skipped)
  if group is None or len(counts) == 1:
    return int(counts.sum())
  groups = multihost.gather_ints(int(group[0]))
  _, first = np.unique(groups, return_index=True)
  return int(counts[first].sum())


class Logger:
  """Writes a log step's scalars (TensorBoard, ``on_log``, one log line)."""

  def __init__(self, writer, guard, progress, info, num_steps, on_log, task,
               batch_size, data_group=None, flops=lambda: None,
               peak_tflops=None):
    """``flops()``: FLOPs per device per step (``flops.step_flops``; None or
    False: unknown); ``peak_tflops``: a device's peak (None: unknown)."""
    self.writer, self.guard, self.progress = writer, guard, progress
    self.info, self.num_steps, self.on_log = info, num_steps, on_log
    self.task, self.batch_size = task, batch_size
    self.data_group = data_group
    self.flops, self.peak_tflops = flops, peak_tflops

  def __call__(self, done: int, means: dict, norms: dict, count: int) -> None:
    """``means`` of the ``count`` steps up to ``done``; ``norms``: the
    parameter groups' norms at ``done``."""
    scalars = dict(means)
    nonfinite_steps = round(scalars.pop("nonfinite") * count)
    for key in [k for k in scalars if k.startswith("nonfinite/")]:
      del scalars[key]   # the guard's, to blame a group
    self.guard.record(scalars["loss"], norms)
    if nonfinite_steps:   # only reached with check_finite off
      logging.warning("%d update(s) with NaN/Inf loss or gradients skipped "
                      "in steps %d-%d.", nonfinite_steps, done - count + 1, done)
    scalars["nonfinite_steps"] = float(nonfinite_steps)
    scalars.update({f"param_norm/{g}": v for g, v in norms.items()})
    scalars.update(self.progress(done))
    # The log's own work (its first call compiles the schedules' ops and
    # opens the writer) is not the next interval's training time.
    started = time.perf_counter()
    if "steps_per_sec" in scalars:
      scalars["examples_per_sec"] = scalars["steps_per_sec"] * self.batch_size
      flops = self.flops()
      if flops:
        scalars["tflops_per_device"] = scalars["steps_per_sec"] * flops / 1e12
        if self.peak_tflops:
          scalars["flops_utilization"] = (scalars["tflops_per_device"]
                                          / self.peak_tflops)
    # The last update's rate (update done - 1; a warm-up starts at 0).
    scalars.update({f"lr/{g}": v for g, v in
                    self.task.learning_rates(done - 1).items()})
    scalars["skipped_records"] = float(skipped_records(self.info,
                                                       self.data_group))
    self.writer.write_scalars(done, scalars)
    if self.on_log is not None:
      self.on_log(done, scalars)
    rate = scalars.get("steps_per_sec")
    logging.info("step %d/%d loss %.4f  %s steps/s%s  ETA %s", done,
                 self.num_steps, scalars["loss"],
                 "-" if rate is None else f"{rate:.2f}", _flops_text(scalars),
                 metrics_lib.format_eta(scalars.get("eta_sec", float("inf"))))
    self.progress.exclude(time.perf_counter() - started)


def _flops_text(scalars: dict) -> str:
  """"  41.2 TFLOP/s per device (21% of peak)", or "" when not counted."""
  tflops = scalars.get("tflops_per_device")
  if tflops is None:
    return ""
  share = scalars.get("flops_utilization")
  return f"  {tflops:.3g} TFLOP/s per device" + (
      "" if share is None else f" ({share:.0%} of peak)")
