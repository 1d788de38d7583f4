"""The metric writer: scalars to the log and TensorBoard, hyperparameters to
TensorBoard only."""

import glob
import logging

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
