"""The metric writer: scalars to the log and TensorBoard, hyperparameters to
TensorBoard only."""

import glob
import logging

from genvis_jax.core import metrics as metrics_lib


def test_hyperparameters_go_to_tensorboard_not_the_log(tmp_path, caplog):
  writer = metrics_lib.create_writer(str(tmp_path))
  with caplog.at_level(logging.INFO):
    writer.write_hparams({"model.name": "far", "train.num_steps": 20})
    writer.write_scalars(3, {"loss": 1.5})
    writer.flush()
  assert "Hyperparameters" not in caplog.text and "far" not in caplog.text
  assert "loss=1.5" in caplog.text
  (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  raw = open(events, "rb").read()
  assert b"hparams" in raw and b"train.num_steps" in raw and b"loss" in raw
