"""The metric writer: scalars to the log and TensorBoard, hyperparameters to
TensorBoard only."""

import glob
import logging
import re

from genvis_jax.core import metrics as metrics_lib


def test_hyperparameters_go_to_tensorboard_not_the_log(tmp_path, caplog):
  # A pathlib.Path, as a notebook passes a workdir (TensorFlow's writer
  # refused it after a whole generation evaluation).
  writer = metrics_lib.create_writer(tmp_path)
  with caplog.at_level(logging.INFO):
    writer.write_hparams({"model.name": "far", "train.num_steps": 20})
    writer.write_scalars(3, {"loss": 1.5})
    writer.flush()
  assert "Hyperparameters" not in caplog.text and "far" not in caplog.text
  assert "loss=1.5" in caplog.text
  (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  raw = open(events, "rb").read()
  assert b"hparams" in raw and b"train.num_steps" in raw and b"loss" in raw


def test_progress_rates_count_from_a_restart(monkeypatch):
  """The trainer restarts the interval after the first step, so its
  compilation time inflates neither steps/s nor the ETA."""
  now = [100.0]
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: now[0])
  progress = metrics_lib.Progress(0, 1000)
  now[0] += 60.0                                 # step 1: compiles for a minute
  assert progress.restart(1) == 60.0
  now[0] += 9.9                                  # 99 more steps at 10 steps/s
  got = progress(100)
  assert abs(got["steps_per_sec"] - 10.0) < 1e-9
  assert abs(got["eta_sec"] - 90.0) < 1e-9
  assert metrics_lib.format_eta(got["eta_sec"]) == "0:01:30"
  assert metrics_lib.format_eta(float("inf")) == "?"
  # A sample grid (its first draw compiles the sampler) is not training
  # time: steps/s read 0.56 around one, against 22 either side.
  now[0] += 2.0                                  # 20 steps
  now[0] += 30.0                                 # the grid
  progress.exclude(30.0)
  assert abs(progress(120)["steps_per_sec"] - 10.0) < 1e-9
  # A log at the compiled first step has no rate (it read 0.08 steps/s and
  # an ETA of 7 hours).
  first = metrics_lib.Progress(0, 10)
  now[0] += 60.0
  first.restart(1)
  assert first(1) == {}


def test_a_resumed_run_replaces_the_steps_it_redoes_in_tensorboard(tmp_path):
  """A run killed at step 70 resumes from its step-50 checkpoint: every tag
  held 5..70 then 55..70 again (TensorBoard kept both: the curves doubled
  back). The restart mark makes it drop the old 55..70."""
  import time  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_accumulator as pea  # pylint: disable=import-outside-toplevel

  def run(start, steps):    # as the trainer starts its writer
    metrics_lib.mark_start(tmp_path, start)
    writer = metrics_lib.create_writer(tmp_path)
    for s in steps:
      writer.write_scalars(s, {"loss": float(s)})
    writer.flush()
    writer.close()
  run(0, range(5, 75, 5))
  time.sleep(1.0)     # a crashed run's restart takes longer than this
  run(50, range(55, 105, 5))
  acc = pea.EventAccumulator(str(tmp_path), size_guidance={pea.TENSORS: 0})
  acc.Reload()
  steps = [e.step for e in acc.Tensors("loss")]
  assert steps == list(range(5, 105, 5)), steps


def test_a_full_disk_under_the_metrics_is_one_named_error(tmp_path,
                                                          monkeypatch, caplog):
  """TensorBoard's writer failing (here: no space left) surfaced as clu's
  ``AsyncError`` with a traceback through its threads; it is an
  ``OutputWriteError`` naming the folder and the system's error."""
  import errno  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel

  def full(self, step, scalars):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(metric_writers.SummaryWriter, "write_scalars", full)
  writer = metrics_lib.create_writer(tmp_path)
  with caplog.at_level(logging.ERROR), pytest.raises(
      errors.OutputWriteError, match=rf"TensorBoard event files\) under "
      rf"{re.escape(str(tmp_path))} failed: .*No space left on device\. Free space"):
    writer.write_scalars(3, {"loss": 1.5})
    writer.flush()
  # Nor does clu's thread log its traceback first.
  assert "producer thread" not in caplog.text, caplog.text


def test_event_files_of_a_later_clock_are_warned_of(tmp_path, caplog):
  """A resume on a machine whose clock is behind the one that wrote the
  event files: its files sort first, and TensorBoard hid its points."""
  import time  # pylint: disable=import-outside-toplevel
  later = int(time.time()) + 3600
  (tmp_path / f"events.out.tfevents.{later}.host.1.0").write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    metrics_lib.mark_start(tmp_path, 10)
  assert "named by a later time" in caplog.text and "Set the clock" in (
      caplog.text)
  caplog.clear()
  (tmp_path / f"events.out.tfevents.{later}.host.1.0").unlink()
  with caplog.at_level(logging.WARNING):
    metrics_lib.mark_start(tmp_path, 20)
  assert "later time" not in caplog.text


def test_a_devices_peak_flops_by_its_kind():
  """``flops.peak_tflops``: the dense bf16 peak of the device kinds jax
  reports (the most specific entry first), the configured value over it,
  None for a device it does not know."""
  from genvis_jax.core import flops   # pylint: disable=import-outside-toplevel
  for kind, peak in (("TPU v4", 275.0), ("TPU v5 lite", 197.0),
                     ("TPU v5", 459.0), ("TPU v5p", 459.0),
                     ("TPU v6 lite", 918.0), ("TPU v3", 61.5),
                     ("NVIDIA H100 80GB HBM3", 989.0),
                     ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                     ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None)):
    assert flops.peak_tflops(kind) == peak, kind
  assert flops.peak_tflops("cpu", 2.5) == 2.5
  assert flops.peak_tflops("TPU v4", 100.0) == 100.0


def test_a_log_steps_own_work_is_not_the_next_intervals(monkeypatch):
  """The log step's first call does one-off work (the schedules' ops
  compile, the writer opens): the interval after it read about half speed
  in every run. Its time is left out of the next interval's steps/s."""
  import types   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import log_step   # pylint: disable=import-outside-toplevel
  now = [0.0]
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: now[0])
  monkeypatch.setattr(log_step.time, "perf_counter", lambda: now[0])
  logged = {}

  def write(step, scalars):
    logged[step] = scalars
    now[0] += 5.0                     # a slow first write
  progress = metrics_lib.Progress(0, 100)
  logger = log_step.Logger(
      types.SimpleNamespace(write_scalars=write),
      types.SimpleNamespace(record=lambda *_: None), progress,
      types.SimpleNamespace(num_skipped=0), 100, None,
      types.SimpleNamespace(learning_rates=lambda _: {}), 8)
  for step in (2, 4):
    now[0] += 2.0                     # two steps at one step/s
    logger(step, {"loss": 1.0, "nonfinite": 0.0}, {}, 2)
  assert logged[2]["steps_per_sec"] == logged[4]["steps_per_sec"] == 1.0
