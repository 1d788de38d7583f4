"""Pre-tokenized data for training: token record files, their pipeline, the
checks of where they came from, and the errors for missing or damaged files."""

import json
import logging
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from genvis_jax import data
from genvis_jax.data import token_integrity, token_origin, token_output, tokens
from tests.data_common import data_config


def test_token_records_round_trip_and_pipeline(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 1000, 12).astype(np.int32)
  toks = rng.integers(0, 16384, (12, 2, 8)).astype(np.int32)
  paths = data.write_token_records(str(tmp_path / "tok" / "train"), labels, toks,
                                   num_shards=3)
  assert [os.path.basename(p) for p in paths] == [
      f"train-{i:05d}-of-00003.array_record" for i in range(3)]
  src = data.TokenSource(str(tmp_path / "tok" / "train-*.array_record"))
  assert len(src) == 12 and src.token_shape == (2, 8)
  for i in range(12):
    np.testing.assert_array_equal(src[i]["tokens"], toks[i])
    assert src[i]["label"] == labels[i] and src[i]["tokens"].dtype == np.int32
  # Codes beyond uint16 and 1D codes use the int32 path.
  big = tokens.decode_record(tokens.encode_record(3, np.array([70000, 1])))
  assert big["tokens"].tolist() == [70000, 1] and big["label"] == 3
  # uint16 (2 bytes a code) up to 65,535 exactly; 65,536 does not wrap to 0.
  for codes, nbytes in (([65535, 0], 2), ([65536, 0], 4), ([-1, 0], 4)):
    record = tokens.encode_record(0, np.array(codes))
    assert len(record) == 20 + 2 * nbytes
    assert tokens.decode_record(record)["tokens"].tolist() == codes

  c = data_config(source="tokens", path=str(tmp_path / "tok" / "{split}-*"))
  it, info = data.create_dataset(c, split="train", global_batch_size=4, seed=0,
                                 train=False, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 3 and info.token_shape == (2, 8)
  assert batches[0]["tokens"].shape == (4, 2, 8)
  assert batches[0]["tokens"].dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                labels)
  # Pre-tokenizing keeps the last partial batch.
  it, _ = data.create_dataset(c, split="train", global_batch_size=5, seed=0,
                              train=False, process_index=0, process_count=1,
                              drop_remainder=False)
  assert [len(b["label"]) for b in it] == [5, 5, 2]


def test_training_checks_where_the_token_files_came_from(tmp_path, caplog):
  import json
  import logging
  import ml_collections
  from genvis_jax.core import weights
  from genvis_jax.data import token_origin
  from genvis_jax.errors import ConfigError
  weights.save_params(str(tmp_path / "tok"), {"w": np.zeros(2, np.float32)})
  now = weights.params_source(str(tmp_path / "tok"))
  paths = [data.write_token_records(str(tmp_path / d / "train"),
                                    np.arange(2, dtype=np.int32),
                                    np.zeros((2, 4), np.int32))[0]
           for d in ("a", "b")]
  config = ml_collections.ConfigDict(dict(
      data=dict(source="tokens", path=str(tmp_path / "a" / "{split}-*"),
                split="train"),
      model=dict(codebook_size=256),
      tokenizer=dict(checkpoint=str(tmp_path / "tok"))))
  check = lambda: token_origin.check_training_files(config)

  def record(path, weights_source, num_codes=256, **settings):
    with open(path + ".json", "w") as f:
      json.dump({"settings": {"weights": weights_source,
                              "tokenizer": {"num_codes": num_codes},
                              **settings},
                 "records": 2}, f)
  assert check() == ""       # nothing recorded
  for written, warns in ((now, False), ("step 4 committed 1", True)):
    record(paths[0], written)
    msg = check()
    assert bool(msg) == warns, msg
  assert "written with tokenizer weights ['step 4 committed 1']" in msg
  # Codes of another tokenizer layout (MaskGIT codes for FAR, dual for a
  # triple FQGAN): refused before the first batch, naming the difference.
  config.tokenizer.model = ml_collections.ConfigDict(dict(
      name="fqgan", branches=("vis", "sem", "pix"), image_size=256,
      dtype="bfloat16"))
  for tok, diff in ((dict(name="maskgit_vqgan"),
                     "name: files 'maskgit_vqgan' vs config 'fqgan'"),
                    (dict(name="fqgan", branches=["vis", "sem"],
                          image_size=256, dtype="float32"),
                     "branches: files ['vis', 'sem'] vs config "
                     "['vis', 'sem', 'pix']")):
    with open(paths[0] + ".json", "w") as f:
      json.dump({"settings": {"weights": now, "tokenizer": tok}}, f)
    with pytest.raises(data.TokenFileError, match=re.escape(diff)):
      check()
  del config.tokenizer["model"]
  # More codes than the generator's codebook: an error naming both counts.
  record(paths[0], now, num_codes=1024)
  with pytest.raises(ConfigError, match=r"codes 0..1023 .*num_codes=1024.*"
                     r"codebook_size=256. Set --config.model.codebook_size=1024"):
    check()
  # A glob over two pre-tokenize outputs of different weights: refused.
  record(paths[0], now)
  record(paths[1], "step 9 committed 2")
  config.data.path = str(tmp_path / "*" / "{split}-*")
  with pytest.raises(data.TokenFileError,
                     match=r"2 different tokenizer weights .*step 9 committed "
                           r"2': 1 file.*one pre-tokenize run"):
    check()
  # ... of the same weights and settings: the same images twice, refused.
  record(paths[1], now)
  with pytest.raises(data.TokenFileError,
                     match=r"2 pre-tokenize outputs written with the same "
                           r"settings .*read once per output"):
    check()
  # ... of another split, or ten crops beside centre crops: refused.
  for other in (dict(split="validation"), dict(ten_crop=False, mirrored=True)):
    record(paths[0], now, split="train", ten_crop=True)
    record(paths[1], now, **{"split": "train", "ten_crop": True, **other})
    with pytest.raises(data.TokenFileError,
                       match=r"2 different pre-tokenize settings \(.*split='train', "
                             r"ten_crop=True: 1 file"):
      check()
  # ... two slices of one split (TFDS "train[:50%]" / "train[50%:]"): one split.
  record(paths[0], now, split="train[:50%]", ten_crop=True)
  record(paths[1], now, split="train[50%:]", ten_crop=True)
  check()
  # ... the first 32 and the first 48 images of one split: a warning.
  for path, n in zip(paths, (32, 48)):
    record(path, now, split="train", data={"path": "/x", "num_examples": n})
  with caplog.at_level(logging.WARNING):
    check()
  assert "2 pre-tokenize outputs of the same data and split train" in caplog.text
  # ... of other data (another folder): a warning that examples may count twice.
  record(paths[0], now, data={"path": "/x"})
  record(paths[1], now, data={"path": "/y"})
  with caplog.at_level(logging.WARNING):
    assert check() == ""
  assert any("each example is seen twice" in r.getMessage()
             for r in caplog.records)


def test_damaged_token_files_are_named(tmp_path):
  paths = data.write_token_records(
      str(tmp_path / "tok" / "train"), np.arange(12, dtype=np.int32),
      np.zeros((12, 8), np.int32), num_shards=3)
  pattern = str(tmp_path / "tok" / "train-*.array_record")
  # Shard 1: bytes of its second record's chunk flipped; read fails there.
  raw = bytearray(open(paths[1], "rb").read())
  raw[200:260] = bytes(b ^ 0xFF for b in raw[200:260])
  open(paths[1], "wb").write(bytes(raw))
  src = data.TokenSource(pattern)
  assert src[4]["label"] == 4          # record 0 of shard 1 is intact
  with pytest.raises(data.TokenFileError,
                     match=r"train-00001-of-00003.array_record: record 1 "
                           r"cannot be read .*overwrite=True"):
    src[5]  # pylint: disable=pointless-statement
  c = data_config(source="tokens", path=str(tmp_path / "tok" / "{split}-*"))
  it, _ = data.create_dataset(c, split="train", global_batch_size=4, seed=0,
                              train=False, process_index=0, process_count=1)
  with pytest.raises(data.TokenFileError, match="00001-of-00003.array_record: record 1"):
    list(it)
  # Shard 2 cut short: the source refuses it by name before any read.
  open(paths[2], "r+b").truncate(1000)
  with pytest.raises(data.TokenFileError,
                     match=r"train-00002-of-00003.array_record \(1000 bytes\) "
                           "cannot be opened.*truncated"):
    data.TokenSource(pattern)


def test_training_checks_token_bytes_before_the_first_step(tmp_path,
                                                           monkeypatch):
  """A damaged token file stops training at its start (where the records'
  SHA-256 differs), not at the step that reads it; each process hashes its
  share of the files, once."""
  paths = data.write_token_records(
      str(tmp_path / "tok" / "train"), np.arange(12, dtype=np.int32),
      np.zeros((12, 8), np.int32), num_shards=3)
  for path in paths:
    with open(path + ".json", "w") as f:
      json.dump({"records": 4, "sha256": tokens.file_sha256(path)}, f)
  config = ml_collections.ConfigDict(dict(
      data=dict(source="tokens", path=str(tmp_path / "tok" / "{split}-*"),
                split="train", verify_checksums=True),
      model=dict(codebook_size=256)))
  hashed = []
  real = token_integrity.file_sha256
  monkeypatch.setattr(token_integrity, "file_sha256",
                      lambda p: hashed.append(p) or real(p))
  monkeypatch.setattr(token_integrity, "_VERIFIED", {})
  # Process 1 of 2 hashes the second file only.
  with monkeypatch.context() as m:
    m.setattr(jax, "process_count", lambda: 2)
    m.setattr(jax, "process_index", lambda: 1)
    token_integrity.verify_checksums(str(tmp_path / "tok" / "train-*"))
  assert hashed == [paths[1]]
  token_origin.check_training_files(config)
  assert sorted(hashed) == sorted(paths)   # paths[1] not hashed twice
  # One byte of the last record flipped: readable until that record.
  raw = bytearray(open(paths[2], "rb").read())
  raw[-100] ^= 0xFF
  open(paths[2], "wb").write(bytes(raw))
  monkeypatch.setattr(token_integrity, "_VERIFIED", {})
  with pytest.raises(data.TokenFileError,
                     match=r"1 token file\(s\) no longer hold .*"
                           r"train-00002-of-00003.array_record\..*overwrite=True"):
    token_origin.check_training_files(config)
  # A file that cannot be read is named as such, not as damaged.
  def gone(path):
    raise FileNotFoundError(f"no such object: {path}")
  monkeypatch.setattr(token_integrity, "file_sha256", gone)
  monkeypatch.setattr(token_integrity, "_VERIFIED", {})
  with pytest.raises(data.TokenFileError,
                     match=r"^3 token file\(s\) could not be read to check "
                           r"them: .*FileNotFoundError: no such object"):
    token_origin.check_training_files(config)
  config.data.verify_checksums = False
  token_origin.check_training_files(config)


def test_missing_token_files_say_to_pretokenize(tmp_path):
  pattern = str(tmp_path / "none-*.array_record")
  assert not data.token_files_exist(pattern)
  c = data_config(source="tokens", path=pattern)
  with pytest.raises(data.DataNotFoundError, match="pretokenize"):
    data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  # The pretokenize workdir or its tokens/ folder: name the files there.
  data.write_token_records(str(tmp_path / "pre" / "tokens" / "val"),
                           np.arange(2, dtype=np.int32), np.zeros((2, 4), np.int32))
  for folder in ("pre", "pre/tokens"):
    with pytest.raises(data.DataNotFoundError,
                       match=r"matches the folder .*, not token files.*"
                             r"pre/tokens/val-\*.array_record"):
      data.TokenSource(str(tmp_path / folder))
  # A glob that also matches the records beside the files reads the files only.
  with open(str(tmp_path / "pre" / "tokens" / "val-00000-of-00001.array_record.json"), "w") as f:
    f.write("{}")
  assert len(data.TokenSource(str(tmp_path / "pre" / "tokens" / "val-*"))) == 2


def _check_sets(pattern):
  tokens.check_shard_sets(pattern, tokens.glob_files(pattern))


def test_incomplete_or_doubled_shard_sets_are_refused(tmp_path, caplog):
  """A pod's pre-tokenize output read with a file missing (a process failed,
  a copy stopped) or beside another process count's output of the same split
  would train on part of the data, or on examples twice, silently."""
  d = tmp_path / "tokens"
  labels, toks = np.arange(8, dtype=np.int32), np.zeros((8, 4), np.int32)
  paths = data.write_token_records(str(d / "train"), labels, toks, num_shards=4)
  everything = str(d / "train-*.array_record")
  _check_sets(everything)
  os.remove(paths[2])
  for spelt in (everything, str(tmp_path) + "//tokens/./train-*.array_record"):
    with pytest.raises(data.DataNotFoundError,
                       match=r"matches 3 of the 4 token files of .*train; missing "
                             r"1: train-00002-of-00004.array_record\. .*again "
                             r"on 4 processes"):
      _check_sets(spelt)
  # Training checks on process 0 before it reads (and every process stops).
  config = ml_collections.ConfigDict(
      {"data": data_config(source="tokens", path=everything)})
  with pytest.raises(data.DataNotFoundError, match="missing 1: train-00002"):
    token_origin.check_training_files(config)
  # A glob narrowed on purpose asks for its own files only.
  _check_sets(str(d / "train-0000[01]-of-00004.array_record"))
  with pytest.raises(data.DataNotFoundError, match="missing 1: train-00002"):
    _check_sets(str(d / "train-0000[0-2]-of-00004.array_record"))
  # The same split again on 2 processes, into the same folder.
  data.write_token_records(str(d / "train"), labels, toks, num_shards=2)
  with pytest.raises(data.TokenFileError,
                     match=r"2 pre-tokenize outputs .*\(2 of 2 files -of-00002, "
                           r"3 of 4 files -of-00004\).*more than once.*"
                           r"train-\*-of-00002.array_record"):
    _check_sets(everything)
  _check_sets(str(d / "train-*-of-00002.array_record"))
  # The hint for a folder given as the path names one set, not both.
  with pytest.raises(data.DataNotFoundError,
                     match=r"e\.g\. '.*tokens/train-\*-of-00002\.array_record'"):
    data.TokenSource(str(d))
  # Pre-tokenizing (1 process here) into a folder holding other counts' sets
  # of the same split says so before it starts; another split's do not count.
  data.write_token_records(str(d / "val"), labels, toks, num_shards=1)
  with caplog.at_level(logging.WARNING):
    token_output.warn_other_sets(str(d / "train"))
    token_output.warn_other_sets(str(d / "val"))
  [warning] = [r.getMessage() for r in caplog.records]
  assert re.search(r"tokens/train-\*.array_record already holds token files written by another number of processes "
                   r"\(2 file\(s\) -of-00002, 3 file\(s\) -of-00004\); this "
                   r"run writes -of-00001", warning), warning
  caplog.clear()
  token_output.warn_other_sets(str(tmp_path / "empty" / "train"))
  assert not caplog.records
  # A listing error (e.g. a bucket's 403) is logged, not raised: process 0
  # alone runs this, and the others would wait for it.
  with pytest.MonkeyPatch.context() as m, caplog.at_level(logging.WARNING):
    m.setattr(tokens, "glob_files", lambda p: (_ for _ in ()).throw(
        PermissionError("403")))
    token_output.warn_other_sets(str(d / "train"))
  assert "Could not list" in caplog.text and "403" in caplog.text
  # Names of another form are not checked.
  for i, path in enumerate(data.write_token_records(
      str(tmp_path / "x" / "val"), labels, toks, num_shards=3)[:2]):
    os.rename(path, str(tmp_path / "x" / f"mine{i}.array_record"))
  _check_sets(str(tmp_path / "x" / "mine*.array_record"))


def test_a_run_remembers_where_its_tokens_came_from(tmp_path):
  import json
  import ml_collections
  from genvis_jax.data import run_origin
  from genvis_jax.sample import trained_with
  path = data.write_token_records(str(tmp_path / "train"), np.arange(2, dtype=np.int32),
                                  np.zeros((2, 4), np.int32))[0]
  record = lambda w, sha="a": open(path + ".json", "w").write(
      json.dumps({"settings": {"weights": w}, "records": 2, "sha256": sha}))
  config = ml_collections.ConfigDict(dict(data=dict(
      source="tokens", path=str(tmp_path / "{split}-*"), split="train"),
      sample=dict(allow_model_changes="")))
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  record("step 20 committed 1")
  run_origin.check(config, wd, None)               # fresh run: nothing to check
  assert not os.listdir(wd)                          # ... and nothing written
  run_origin.record(config, wd, None)              # recorded once restored
  run_origin.check(config, wd, 5)                  # resume, same files
  assert run_origin.files_changed(config, wd, 5) == ""
  run_origin.record(config, wd, 5)
  # The same weights, the files written again (e.g. centre crops for ten):
  # the saved input position counts in the old files, so it is not used.
  record("step 20 committed 1", sha="b")
  run_origin.check(config, wd, 5)
  changed = lambda step: run_origin.files_changed(config, wd, step)
  assert "other token files than config.data.path" in changed(5)
  run_origin.record(config, wd, 5)                 # the next saves count in these
  # Stopped before its next save: step 5's position still counts the old
  # files; a checkpoint saved after the switch counts these.
  assert "other token files" in changed(5) and changed(10) == ""
  run_origin.record(config, wd, 5)
  assert "other token files" in changed(5)
  run_origin.record(config, wd, 10)
  assert changed(10) == "" and "pending" not in json.loads(
      open(os.path.join(wd, run_origin.ORIGIN_FILE)).read())
  record("step 30 committed 2")                      # written again since
  with pytest.raises(data.TokenFileError,
                     match=r"trained to step 5 on token files written with "
                           r"tokenizer weights \['step 20 committed 1'\].*now "
                           r"hold \['step 30 committed 2'\]"):
    run_origin.check(config, wd, 5)
  # Sampling the run (or one of its steps) with other tokenizer weights is
  # refused, unless named on purpose (then it warns).
  step = os.path.join(wd, "checkpoints", "5")
  check = lambda *a: trained_with.check_tokenizer_origin(config, *a)
  assert check(step, "step 20 committed 1") == ""
  with pytest.raises(trained_with.TrainedWithError,
                     match=r"trained on tokens of tokenizer weights \['step 20 "
                           r"committed 1'\].*allow_model_changes="
                           r"tokenizer.checkpoint"):
    check(step, "step 30 committed 2")
  assert check(str(tmp_path / "converted"), "x") == ""
  config.sample.allow_model_changes = "model.window, tokenizer.checkpoint"
  assert "another tokenizer" in check(step, "step 30 committed 2")


def test_labels_beyond_the_models_classes_are_refused(tmp_path, caplog):
  """Token files with labels 0..10 (their record's max_label; the
  pre-tokenize setting of 1000 classes is only an upper bound): refused by a
  data config of 10 classes (the pipeline) and by a model of 10 classes (the
  trainer); label 10 would train as the null class, larger ones read past
  the table."""
  import json
  import types
  from configs import base
  from genvis_jax.errors import ConfigError
  from genvis_jax.train import trainer as trainer_lib
  path = data.write_token_records(str(tmp_path / "train"),
                                  np.arange(11, dtype=np.int32),
                                  np.zeros((11, 4), np.int32))[0]
  with open(path + ".json", "w") as f:
    json.dump({"settings": {"data": {"num_classes": 1000}}, "records": 11,
               "max_label": 10}, f)
  config = base.get_config()
  config.data = data_config(source="tokens", path=str(tmp_path / "{split}-*"),
                             num_classes=10)
  config.model.num_classes = 10
  config.train.global_batch_size = 2
  task = types.SimpleNamespace(value_range=(0.0, 1.0))
  with pytest.raises(data.sources.DataConfigError,
                     match=r"'tokens' data has 11 classes but "
                           r"config.data.num_classes is 10.*"
                           r"--config.data.num_classes=11; .*"
                           r"--config.model.num_classes=11\."):
    trainer_lib.create_train_iterator(config, task)
  config.data.num_classes = 11
  # The files record their labels: config.data.num_classes=10 is refused
  # above, so it is no fix here.
  with pytest.raises(ConfigError,
                     match=r"11 classes \(labels 0...10\) but "
                           r"config.model.num_classes is 10: label 10 would "
                           r"train as the model's null.*"
                           r"--config.model.num_classes=11 \(the data's own "
                           r"count, which config.data.num_classes cannot "
                           r"lower\); a model of 10 classes needs other "
                           r"data, with labels 0...9 only\.$") as e:
    trainer_lib.create_train_iterator(config, task)
  assert "--config.data.num_classes" not in str(e.value)
  # Files (labels 0..9) that do not record their labels:
  # config.data.num_classes stands for them, and setting it as told trains.
  data.write_token_records(str(tmp_path / "train"), np.arange(11) % 10,
                           np.zeros((11, 4), np.int32))
  with open(path + ".json", "w") as f:
    json.dump({"settings": {"data": {"num_classes": 1000}}, "records": 11}, f)
  with pytest.raises(ConfigError,
                     match=r"^config.data.num_classes is 11 \(the data do "
                           r"not record their classes; labels 0...10\) "
                           r"but config.model.num_classes is 10: .*"
                           r"--config.model.num_classes=11, or, if every "
                           r"label of the data is below 10, "
                           r"--config.data.num_classes=10\.$"):
    trainer_lib.create_train_iterator(config, task)
  config.data.num_classes = 10
  trainer_lib.create_train_iterator(config, task)
  data.write_token_records(str(tmp_path / "train"), np.arange(11),
                           np.zeros((11, 4), np.int32))
  with open(path + ".json", "w") as f:
    json.dump({"settings": {"data": {"num_classes": 1000}}, "records": 11,
               "max_label": 10}, f)
  config.data.num_classes = config.model.num_classes = 11
  trainer_lib.create_train_iterator(config, task)
  # More model classes than the data hold: trains, and says which never do.
  config.model.num_classes = 1000
  with caplog.at_level(logging.WARNING):
    trainer_lib.create_train_iterator(config, task)
  assert ("11 classes (labels 0...10) but config.model.num_classes is 1000: "
          "classes 11...999 are never trained") in caplog.text


def test_a_data_setting_added_later_keeps_older_records_matching():
  """``data.center_crop`` came after token files were written: at its
  default (the ADM crop those files used) the record leaves it out, so they
  are still reused; another crop is another setting."""
  from configs import demo
  c = demo.pretokenize_config()
  c.tokenizer.checkpoint = "/ckpt/tokenizer"
  now = token_output.output_settings(c)
  assert "center_crop" not in now["data"]
  with c.pretokenize.data.unlocked():
    del c.pretokenize.data["center_crop"]
  assert token_output.output_settings(c) == now   # as recorded before the key
  c.pretokenize.data.center_crop = "adm"      # what "" means: the same record
  assert token_output.output_settings(c) == now
  c.pretokenize.data.center_crop = "torchvision"
  assert token_output.output_settings(c)["data"]["center_crop"] == "torchvision"
