"""Crop records in token files: the mirror images of centre-crop files, and
an epoch of one of each image's ten crops (``crops_per_epoch="one"``)."""

import json
import os

import numpy as np
import pytest

from genvis_jax import data
from genvis_jax import errors as errors_lib
from genvis_jax.data import ten_crop, tokens
from tests.data_common import data_config


def test_records_of_a_batch_and_their_labels():
  """Without ten crops: the batch, then its mirror images (RAR's
  pretokenization.py: torch.cat([samples, torch.flip(samples, dims=[-1])]));
  with them, each image's ten crops in a row under its label (tiled labels
  passed every test that uses one class)."""
  x = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
  images, labels = ten_crop.model_inputs(x, np.array([5, 7]), 3, False)
  np.testing.assert_array_equal(images, np.concatenate([x, x[:, :, ::-1]]))
  np.testing.assert_array_equal(labels, [5, 7, 5, 7])
  # Ten crops: an image's 10 crops are consecutive records, with its label
  # (the ten-crop geometry itself: test_fidelity).
  x = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
  images, labels = ten_crop.model_inputs(x, np.array([5, 7]), 6, True)
  np.testing.assert_array_equal(labels, [5] * 10 + [7] * 10)
  np.testing.assert_array_equal(images.reshape(2, 10, 6, 6, 3),
                                ten_crop.ten_crop(x, 6))


def _ten_crop_files(folder, images: int, files: int, settings=None):
  """Token files of ``images`` images x 10 crops (record tokens = (image,
  crop), label = image % 3) over ``files`` files, with pretokenize records."""
  idx = np.arange(images * 10)
  toks = np.stack([idx // 10, idx % 10], axis=1).astype(np.int32)
  paths = data.write_token_records(str(folder / "train"), (idx // 10) % 3,
                                   toks, num_shards=files)
  for p in paths:
    with open(p + ".json", "w") as f:
      json.dump({"settings": settings or {"ten_crop": True},
                 "records": tokens.count_records(p)}, f)
  return str(folder / "{split}-*.array_record")


def test_one_crop_per_image_per_epoch(tmp_path):
  """crops_per_epoch='one' (FAR's official loader): an epoch visits every
  image once, each time with one of its ten crops drawn afresh; 'all'
  (RAR's) takes every record as an example."""
  pattern = _ten_crop_files(tmp_path / "tok", images=6, files=2)
  c = data_config(source="tokens", path=pattern, crops_per_epoch="one")
  make = lambda **kw: data.create_dataset(c, split="train", global_batch_size=6,
                                          seed=0, **kw)
  it, info = make(process_index=0, process_count=1)
  assert (info.num_examples, info.steps_per_epoch) == (6, 1)
  epochs = [next(it) for _ in range(12)]        # one batch = one epoch
  pairs = set()
  for b in epochs:
    image, crop = b["tokens"][:, 0], b["tokens"][:, 1]
    assert sorted(image) == list(range(6))
    np.testing.assert_array_equal(b["label"], image % 3)
    pairs |= set(zip(image.tolist(), crop.tolist()))
  assert len({j for _, j in pairs}) == 10 and len(pairs) > 40
  # Resumed from its state: the same images with the same crops.
  it2, _ = make(process_index=0, process_count=1)
  for _ in range(3):
    next(it2)
  state = it2.get_state()
  it3, _ = make(process_index=0, process_count=1)
  it3.set_state(state)
  np.testing.assert_array_equal(next(it3)["tokens"], epochs[3]["tokens"])
  # Two processes hold three images each.
  shards = [next(make(process_index=p, process_count=2)[0])["tokens"][:, 0]
            for p in (0, 1)]
  # (Global batch 6 over 2 processes: 3 rows each, an epoch of its images.)
  assert sorted(np.concatenate(shards).tolist()) == list(range(6))
  _, info = data.create_dataset(data_config(source="tokens", path=pattern),
                                split="train", global_batch_size=6, seed=0,
                                process_index=0, process_count=1)
  assert info.num_examples == 60                 # "all": every record


def test_one_crop_per_image_needs_the_crop_records(tmp_path):
  """Only ten-crop files, as their records say, have each image's crops as
  neighbours (centre-crop files put a batch's mirror images after it)."""
  kw = dict(split="train", global_batch_size=2, seed=0, process_index=0,
            process_count=1)
  def refused(pattern, match, settings=None, records=None):
    first = pattern.replace("{split}-*", "train-00000-of-00002")
    if settings is None:
      os.remove(first + ".json")
    elif settings == "cut":       # a record cut short (a copy stopped)
      with open(first + ".json", "w") as f:
        f.write('{"settings": {"ten_')
    else:
      with open(first + ".json", "w") as f:
        f.write(json.dumps({"settings": settings, "records": records}))
    c = data_config(source="tokens", path=pattern, crops_per_epoch="one")
    with pytest.raises(tokens.TokenFileError, match=match):
      data.create_dataset(c, **kw)
  refused(_ten_crop_files(tmp_path / "a", 2, 2), r"no readable pretokenize "
          r"record \(.*train-00000-of-00002.array_record.json is missing\).*"
          r"Copy the records with the files \(`cp <")
  refused(_ten_crop_files(tmp_path / "a2", 2, 2), r"no readable pretokenize "
          r"record \(.*\.json is damaged\)", "cut")
  refused(_ten_crop_files(tmp_path / "b", 2, 2), "written without ten-crop",
          {"ten_crop": False, "mirrored": True}, 10)
  refused(_ten_crop_files(tmp_path / "c", 2, 2), r"holds 10 records and its "
          r"record .* says 20", {"ten_crop": True}, 20)
  # 15 records a file, as its record says: not whole groups of ten.
  for p in data.write_token_records(str(tmp_path / "e" / "train"), np.zeros(30, np.int32),
                                    np.zeros((30, 2), np.int32), num_shards=2):
    with open(p + ".json", "w") as f:
      json.dump({"settings": {"ten_crop": True}, "records": 15}, f)
  refused(str(tmp_path / "e" / "{split}-*.array_record"), r"holds 15 records and "
          r"its record .* says 15: not whole groups of ten", {"ten_crop": True}, 15)
  pattern = _ten_crop_files(tmp_path / "d", 2, 2)
  with pytest.raises(errors_lib.UserError, match="crops_per_epoch='some'"):
    data.create_dataset(data_config(source="tokens", path=pattern,
                                     crops_per_epoch="some"), **kw)
  with pytest.raises(errors_lib.UserError, match="cropped afresh"):
    data.create_dataset(data_config(crops_per_epoch="one"), **kw)
  from configs import far_common, far_demo, rar_common  # pylint: disable=import-outside-toplevel
  assert far_common.get_config("b", "dual").data.crops_per_epoch == "one"
  assert rar_common.get_config("b").data.crops_per_epoch == "all"
  assert far_demo.get_config().data.crops_per_epoch == "all"   # centre crops
