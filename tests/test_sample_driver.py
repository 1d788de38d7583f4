"""The sampling driver (``mode=sample``): batches in flight and SIGTERM, the
class labels drawn, settings refused before any weights load, a set grown
or shrunk (no model runs; the settings record and parts:
``test_sample_parts.py``; where its files go and what a killed writer
leaves: ``test_sample_writes.py``)."""

import os
import re
import shutil

import numpy as np
import pytest

from genvis_jax.core import sharding
from genvis_jax.sample import driver
from genvis_jax.sample import labels as sample_labels
from genvis_jax.sample import parts
from genvis_jax.sample import sampler as sampler_lib
from genvis_jax.sample import trained_with
from tests import sample_common as sc


def test_sigterm_stops_sampling_after_the_batch_in_flight(tmp_path, monkeypatch,
                                                         capsys):
  """Each batch is dispatched before the one before it is written (the
  devices draw while the host converts and writes). SIGTERM writes the batch
  being finished, stops with one message, and the same command then draws
  only the rest (no model: the sampler is a stand-in)."""
  import os
  import signal
  import jax
  from configs import rar_b
  config = rar_b.get_config("runlocal")
  config.sample.num_samples, config.sample.batch_size = 3 * 8, 8
  config.sample.seed = 7     # not the config's 0: the keys must come from it
  calls, events = [], []

  def fake_sample_fn(labels, key):
    calls.append(len(calls))
    if len(calls) in (1, 5):
      os.kill(os.getpid(), signal.SIGTERM)
    # The batch's first index, from its key (fold_in(seed key, start)).
    start = [b for b in (0, 8, 16, 24, 32) if np.array_equal(
        jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(
            jax.random.key(config.sample.seed), b)))][0]
    events.append(("dispatch", start))
    return lambda: events.append(("finish", start)) or jax.numpy.zeros(
        (labels.shape[0], 4, 4, 3), jax.numpy.uint8)

  batch_sharding = jax.sharding.NamedSharding(
      sharding.data_mesh(jax.devices()), jax.sharding.PartitionSpec("data"))
  sampler = sampler_lib.Sampler(None, None)
  sampler.dispatch = fake_sample_fn
  monkeypatch.setattr(sampler_lib, "make_sample_fn",
                      lambda *_: (sampler, batch_sharding))
  monkeypatch.setattr(trained_with, "pin_weights", lambda c: c)
  monkeypatch.setattr(trained_with, "pinned_sources", lambda _: {
      "weights.generator": "g", "weights.tokenizer": "t"})
  before = signal.getsignal(signal.SIGTERM)
  wd = str(tmp_path / "wd")
  with pytest.raises(driver.SamplingStopped,
                     match=r"stopped by SIGTERM after the batch of images 0..7.*"
                           r"Run the same command to resume") as stopped:
    driver.sample_and_save(config, wd)
  assert stopped.value.exit_code == 143
  assert signal.getsignal(signal.SIGTERM) == before
  assert sorted(os.listdir(os.path.join(wd, "sample_parts"))) == [
      "000000000.npz", "settings.json"]
  # Batch 1 was dispatched before batch 0 was written, then dropped.
  assert events == [("dispatch", 0), ("dispatch", 8), ("finish", 0)]
  events.clear()
  capsys.readouterr()
  out = driver.sample_and_save(config, wd)       # resumes: two more batches
  assert out["num_samples"] == 24 and len(calls) == 4
  assert events == [("dispatch", 8), ("dispatch", 16), ("finish", 8),
                    ("finish", 16)]
  # Progress: the first batch's line, then at most one per PROGRESS_EVERY_S
  # and the last (a line per batch filled the log).
  lines = capsys.readouterr().out.splitlines()
  progress = [l for l in lines if " images/s" in l]
  assert [l.split(",")[0] for l in progress] == ["[sample] 16/24 images",
                                                 "[sample] 24/24 images"]
  # The last line names what the samples are for, as pre-tokenizing does.
  npz = os.path.join(wd, "samples.npz")
  assert lines[-1].endswith(
      f"; score them with --config.mode=evaluate --config.evaluate.kind="
      f"generation --config.evaluate.samples={npz} --config.evaluate."
      "reference=REF.npz --config.evaluate.inception=ckpt/inception (REF: "
      "an ADM batch, or one of your data: kind=reference; ckpt/inception: "
      "python -m genvis_jax.convert --kind=inception)")
  # ... after saying that the parts hold the images again (and how much).
  assert re.fullmatch(r"\[sample\] .*/sample_parts holds these images again "
                      r"\(0\.\d MiB\), .* delete it once the set is final\.",
                      lines[-2]), lines[-2]
  # A larger set stopped half-way: the 24 images' samples.npz is gone, not
  # left to pass for this run's 40 (its images are in the parts).
  assert os.path.exists(os.path.join(wd, "samples.npz"))
  config.sample.num_samples = 5 * 8
  with pytest.raises(driver.SamplingStopped):
    driver.sample_and_save(config, wd)
  assert not {"samples.npz", "samples.png"} & set(os.listdir(wd))
  assert "removed samples.npz and samples.png of the earlier set" in (
      capsys.readouterr().out)
  shutil.rmtree(os.path.join(wd, "sample_parts"))
  monkeypatch.setattr(driver, "PROGRESS_EVERY_S", 1e9)
  config.sample.num_samples = 4 * 8
  driver.sample_and_save(config, wd)
  progress = [l for l in capsys.readouterr().out.splitlines()
              if " images/s" in l]
  assert [l.split(",")[0] for l in progress] == ["[sample] 8/32 images",
                                                 "[sample] 32/32 images"]
  # A samples.npz beside no parts (its parts deleted, or a file copied in)
  # is kept, and the run stops before drawing: it was removed as "the
  # earlier set (its images are in sample_parts)".
  from genvis_jax import errors
  npz = os.path.join(wd, "samples.npz")
  with open(npz, "rb") as f:
    kept = f.read()
  shutil.rmtree(os.path.join(wd, "sample_parts"))
  events.clear()
  with pytest.raises(errors.OutputExistsError,
                     match=r"samples.npz lies beside no sample parts "
                           r"\(.*sample_parts holds none"):
    driver.sample_and_save(config, wd)
  with open(npz, "rb") as f:
    assert f.read() == kept
  assert events == []


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_start_up_stop_whose_exception_was_lost_draws_nothing(
    tmp_path, monkeypatch, signum, sigint_default):
  """A signal during the loading / compiling whose exception landed where
  Python only prints it (jax's GC hook) was lost: sampling then drew every
  batch (hours for 50,000 images). It stops before the first batch."""
  import signal
  import time
  from genvis_jax import errors
  from genvis_jax import modes
  signum = getattr(signal, signum)
  config, drawn = sc.stand_in_sampler(monkeypatch, 32)
  config.mode = "sample"
  made = sampler_lib.make_sample_fn

  def swallowed(*args):
    try:   # as a callback whose errors Python only prints
      os.kill(os.getpid(), signum)
      time.sleep(5)
    except BaseException:  # pylint: disable=broad-except
      pass
    return made(*args)

  monkeypatch.setattr(sampler_lib, "make_sample_fn", swallowed)
  with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT
                     else errors.StoppedBySignal):
    modes.run(config, str(tmp_path / "wd"))
  assert drawn == []
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_class_labels_are_balanced_and_refuse_classes_the_model_lacks():
  np.testing.assert_array_equal(sample_labels.class_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(sample_labels.class_labels(5, 10, (9, 4)),
                                [9, 4, 9, 4, 9])
  from genvis_jax import errors
  # A typo in config.sample.classes would draw the whole set as garbage.
  with pytest.raises(errors.ConfigError,
                     match=r"config.sample.classes holds \[-1, 10\], not "
                           r"classes of this model: use 0..9"):
    sample_labels.class_labels(4, 10, (3, 10, -1))
  # --config.sample.classes= / =cat / =1.5: not class numbers, said so.
  for given in (("",), ("cat",), (1.5,), (True,)):
    with pytest.raises(errors.ConfigError,
                       match=r"config.sample.classes holds .*, not class numbers"):
      sample_labels.class_labels(4, 10, given)
  np.testing.assert_array_equal(sample_labels.class_labels(2, 10, (np.int64(3),)), [3, 3])
  # The samplers' own check (a notebook passes labels directly): 1.7 was
  # cast to class 1 without a word.
  from genvis_jax.sample import common
  with pytest.raises(errors.ConfigError, match="integer classes, got float32"):
    common.check_labels(np.array([1.7, 0.2], np.float32), 10)
  assert common.check_labels([3, 10], 10).tolist() == [3, 10]


def test_uniform_labels_are_iid_seeded_and_keep_their_prefix():
  """FAR's protocol (torch.randint labels): i.i.d. over the classes, fixed by
  the seed, the first k the same whatever num_samples (a resume may ask for
  more images)."""
  labels = sample_labels.class_labels(50_000, 1000, draw="uniform", seed=0)
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 1000
  counts = np.bincount(labels, minlength=1000)
  assert counts.min() < 40 and counts.max() > 60    # not 50 each
  assert abs(counts.std() - np.sqrt(50 * 0.999)) < 1.0
  for k in (1, 7, 999, 12_345):
    np.testing.assert_array_equal(
        sample_labels.class_labels(k, 1000, draw="uniform", seed=0), labels[:k])
  assert not np.array_equal(
      sample_labels.class_labels(100, 1000, draw="uniform", seed=1), labels[:100])
  some = sample_labels.class_labels(1000, 10, (9, 4), draw="uniform")
  assert set(some.tolist()) == {4, 9}
  from genvis_jax import errors
  with pytest.raises(errors.ConfigError,
                     match=r"config.sample.labels='random'; use one of "
                           r"\('balanced', 'uniform'\)"):
    sample_labels.class_labels(4, 10, draw="random")


def test_paper_configs_sample_as_the_official_samplers():
  """fp32 decoding (RAR's sampler has no autocast; inference produces the
  numbers) and the official label draws: FAR i.i.d., RAR / Equivariant 50
  per class."""
  from configs import eq_s, far_b, rar_b  # pylint: disable=import-outside-toplevel
  for mod, labels in ((rar_b, "balanced"), (far_b, "uniform"),
                      (eq_s, "balanced")):
    c = mod.get_config()
    assert c.sample.dtype == "float32", mod.__name__
    assert c.sample.get("labels", "balanced") == labels, mod.__name__


@pytest.mark.parametrize("key,value,message", [
    ("sample.num_columns", 0, r"config.sample.num_columns=0 must be at least 1"),
    ("sample.num_steps", 0, r"config.sample.num_steps=0 must be at least 1"),
    ("sample.batch_size", 0, r"config.sample.batch_size=0 must be at least 1"),
    ("sample.batch_size", 3, r"config.sample.batch_size=3 must be a multiple "
     r"of the 8 devices"),
    ("sample.dtype", "float16",
     r"config.sample.dtype='float16' is not a supported dtype"),
    # Sampling reads no data.* size: 64 drew the tokenizer's 32 px silently.
    ("data.image_size", 64, r"config.data.image_size=64, but the tokenizer "
     r"decodes 32 px images \(config.tokenizer.model.resolution\).*"
     r"config.sample.num_columns")])
def test_bad_settings_are_refused_before_loading(key, value, message, tmp_path):
  """Named as the flag, before the weights load (init_from does not even
  exist here) and before settings.json is written."""
  from genvis_jax.errors import ConfigError
  from tests import pipeline_common as pc
  config = pc.load_config("eq_s.py:runlocal", **{
      "mode": "sample", "init_from": "/nowhere/run",
      "tokenizer.checkpoint": "/nowhere/tok", key: value})
  with pytest.raises(ConfigError, match=message):
    driver.sample_and_save(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_codebook_the_run_did_not_train_is_named_by_its_record(tmp_path):
  """Sampling a run with another --config.model.codebook_size: the run's
  record names every setting it trained otherwise, with the values, before
  the codebook is judged against the tokenizer (which is right here)."""
  from genvis_jax.sample.trained_with import TrainedWithError
  from tests import pipeline_common as pc
  trained = pc.load_config("rar_b.py:runlocal", mode="sample")
  step = tmp_path / "run" / "checkpoints" / "20"
  (step / "config").mkdir(parents=True)
  (step / "config" / "metadata").write_text(trained.to_json_best_effort())
  n, width = trained.model.codebook_size, trained.model.hidden_size
  config = pc.load_config("rar_b.py:runlocal", **{
      "mode": "sample", "init_from": str(step),
      "tokenizer.checkpoint": "/nowhere/tok", "model.codebook_size": 4 * n,
      "model.hidden_size": 2 * width})
  with pytest.raises(TrainedWithError, match=rf"model.codebook_size: run {n} "
                     rf"vs config {4 * n}\n  model.hidden_size: run {width}"):
    driver.sample_and_save(config, str(tmp_path / "wd"))


FAR, RAR, EQ = "far_b.py:dual,runlocal", "rar_b.py:runlocal", "eq_s.py:runlocal"


G = "guidance_scale"


@pytest.mark.parametrize("spec,key,value,message", [
    (FAR, G, 0, r"guidance_scale=0.0 \(config.sample.guidance_scale\) must be "
                r"at least 1.0; 1.0 means no guidance"),
    (FAR, G, -1, r"guidance_scale=-1.0 .*at least 1.0; 1.0 means no guidance"),
    (FAR, G, 0.5, r"guidance_scale=0.5 .*at least 1.0"),
    (FAR, G, "nan", r"guidance_scale=nan .*at least 1.0"),
    (FAR, "top_k", -1, r"top_k >= 0 and 0 < top_p <= 1 \(config.sample.top_k"
                       r" / config.sample.top_p\), got top_k=-1"),
    (FAR, "top_p", 0.0, r"got top_k=0, top_p=0.0"),
    (FAR, "temperature", 0.0, r"temperature must be a finite number > 0, "
                              r"got 0.0 \(config.sample.temperature"),
    (RAR, G, "nan", r"guidance_scale=nan .*must be a finite number; 0.0 means "
                    r"no guidance"),
    (RAR, G, "inf", r"guidance_scale=inf .*a finite number"),
    (RAR, "guidance_pow", -1.0, r"guidance_pow=-1.0 .*>= 0"),
    (RAR, "temperature", "nan", r"temperature must be a finite number > 0, "
                                r"got nan"),
    (EQ, G, "nan", r"guidance_scale=nan .*a finite number; 1.0 means no "
                   r"guidance")])


def test_a_sampling_setting_drawn_otherwise_is_refused_before_loading(
    spec, key, value, message, tmp_path):
  """FAR's official sampler guides only above 1.0, so 0 or -1 would draw as
  1.0 while settings.json records them; NaN or inf gives noise images in
  every sampler; so do a NaN temperature or a negative RAR guidance_pow.
  Refused, as the filters are, before the weights load (init_from does not
  exist) and before anything is written."""
  from genvis_jax.errors import ConfigError
  from tests import pipeline_common as pc
  config = pc.load_config(spec, **{
      "mode": "sample", "init_from": "/nowhere/run",
      "tokenizer.checkpoint": "/nowhere/tok", f"sample.{key}": value})
  with pytest.raises(ConfigError, match=message):
    driver.sample_and_save(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_each_sampler_takes_the_guidance_scales_its_official_code_applies():
  """RAR: any finite g (0 turns CFG off; below 1 and negative are applied);
  Equivariant: any finite scale (1 = none); FAR: 1 (none) and above."""
  from genvis_jax.errors import ConfigError
  from genvis_jax.sample import eq_generator, far, rar
  for module, ok in ((rar, (-2.0, 0.0, 0.5, 1.0, 16.0)),
                     (eq_generator, (-1.0, 0.0, 0.5, 1.0, 7.0)),
                     (far, (1.0, 1.0001, 2.0))):
    assert [module.check_guidance(v) for v in ok] == list(ok)
    with pytest.raises(ConfigError, match="guidance_scale=nan"):
      module.check_guidance(float("nan"))
  with pytest.raises(ConfigError, match="guidance_scale=0.9999"):
    far.check_guidance(0.9999)


def test_a_smaller_then_larger_set_draws_no_batch_again(tmp_path,
                                                        monkeypatch, capsys):
  """24 images, then 20 (the last part holds 8 of which 4 are asked: kept;
  the smaller samples.npz says how to write them all again), then 24 again:
  only the first run draws; a set grown past a short last part draws that
  part again (it holds fewer images than now asked), as does a damaged
  part."""
  config, drawn = sc.stand_in_sampler(monkeypatch, num_samples=24)
  wd = str(tmp_path / "wd")
  driver.sample_and_save(config, wd)
  assert drawn == [0, 8, 16]
  for n in (20, 24):
    drawn.clear()
    capsys.readouterr()
    config.sample.num_samples = n
    with np.load(driver.sample_and_save(config, wd)["npz"]) as d:
      assert len(d["arr_0"]) == n and len(d["labels"]) == n
    assert not drawn
    said = ("holds the first 20 of the 24 images in "
            f"{wd}/sample_parts; --config.sample.num_samples=24 writes them "
            "all again (nothing is drawn again)")
    assert (said in capsys.readouterr().out) == (n == 20)
  part = parts.path(os.path.join(wd, "sample_parts"), 8)
  with open(part, "r+b") as f:    # cut short (a disk that filled up)
    f.truncate(100)
  driver.sample_and_save(config, wd)
  assert drawn == [8]
  # A damaged part beyond a smaller set is not needed: not read, no error.
  with open(parts.path(os.path.join(wd, "sample_parts"), 16), "r+b") as f:
    f.truncate(100)
  config.sample.num_samples = 12
  assert driver.sample_and_save(config, wd)["num_samples"] == 12
  assert "holds the first 12 of the 16 images" in capsys.readouterr().out
  config.sample.num_samples = 24
  drawn.clear()
  shutil.rmtree(os.path.join(wd, "sample_parts"))
  os.remove(os.path.join(wd, "samples.npz"))   # else kept: see the SIGTERM test
  config.sample.num_samples = 20
  driver.sample_and_save(config, wd)
  drawn.clear()
  config.sample.num_samples = 24
  driver.sample_and_save(config, wd)
  assert drawn == [16]


@pytest.mark.parametrize("processes", [1, 2])
def test_parts_are_written_while_the_next_batch_is_drawn(tmp_path, monkeypatch,
                                                         processes):
  """One process: each batch is dispatched before the one before it is read
  back. Across processes the gather is a program of the devices too, and
  queued behind the next batch it wrote each part only once that batch was
  drawn (devices idle through every write): there a batch is gathered before
  the next is dispatched, and written while that one is drawn."""
  config, drawn = sc.stand_in_sampler(monkeypatch, num_samples=24)
  events = []
  real_gather = driver.multihost_utils.process_allgather
  monkeypatch.setattr(driver, "gathers_on_devices", lambda: processes > 1)
  monkeypatch.setattr(driver.multihost_utils, "process_allgather",
                      lambda x, **kw: events.append("gather") or
                      real_gather(x, **kw))
  real_write = driver.multihost.write_on_process_0
  monkeypatch.setattr(driver.multihost, "write_on_process_0",
                      lambda path, w: events.append("write") or
                      real_write(path, w))
  sampler = sampler_lib.make_sample_fn(config, None)[0]
  dispatch = sampler.dispatch
  sampler.dispatch = lambda *a: events.append("dispatch") or dispatch(*a)
  out = driver.sample_and_save(config, str(tmp_path))
  assert drawn == [0, 8, 16]
  if processes == 1:
    assert events[:7] == ["dispatch", "dispatch", "gather", "write",
                          "dispatch", "gather", "write"]
  else:
    assert events[:7] == ["dispatch", "gather", "dispatch", "write",
                          "gather", "dispatch", "write"]
  with np.load(out["npz"]) as d:
    assert len(d["arr_0"]) == 24


def test_a_seed_outside_32_bits_is_refused_before_anything_loads(tmp_path):
  """jax takes any key but NumPy's label draw refuses a negative seed (a
  traceback after the weights had loaded); a seed of 2**32 drew seed 0's
  images under another record, 2**64 overflowed after the loads. Training's
  config.seed likewise."""
  from configs import rar_b
  from genvis_jax.errors import ConfigError
  from genvis_jax.train import trainer
  config = rar_b.get_config("runlocal")
  for seed in (-1, 2**32, 2**64):
    config.sample.seed = seed
    with pytest.raises(ConfigError, match=rf"config.sample.seed={seed} must "
                       r"be in \[0, 2\*\*32\)"):
      driver.sample_and_save(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
  config.sample.seed = 2**32 - 1
  config.seed = 2**32
  with pytest.raises(ConfigError, match=r"config.seed=4294967296 must be an "
                     r"integer in \[0, 2\*\*32\)"):
    trainer.setup(config)


def test_latents_the_tokenizer_cannot_decode_are_refused_before_loading(
    tmp_path):
  """An Equivariant generator whose latent width is not the tokenizer's
  would load, compile and fail at the first decode without naming a
  setting: refused first, naming both."""
  from genvis_jax.models import inference
  from tests import pipeline_common as pc
  config = pc.load_config("eq_s.py:runlocal", **{
      "mode": "sample", "init_from": "/nowhere/run",
      "tokenizer.checkpoint": "/nowhere/tok", "model.token_dim": 8})
  with pytest.raises(inference.CodebookSizeError,
                     match=r"config.model.token_dim=8 differs from the "
                           r"tokenizer's config.tokenizer.model.embed_dim=16"):
    driver.sample_and_save(config, str(tmp_path))


def test_classes_the_generator_never_trained_are_warned(tmp_path,
                                                        monkeypatch, caplog):
  """A RAR run trained on 4 classes of one's own images (config.model.
  num_classes left at 10) sampled labels 4...9 without a word: its token
  files' records say the trained labels."""
  import json
  import logging
  config, _ = sc.stand_in_sampler(monkeypatch, num_samples=8)
  tokens = tmp_path / "tokens"
  tokens.mkdir()
  (tokens / "train-00000-of-00001.array_record").write_bytes(b"")
  (tokens / "train-00000-of-00001.array_record.json").write_text(
      json.dumps({"max_label": 3}))
  config.data.path = str(tokens / "train-*.array_record")
  with caplog.at_level(logging.WARNING):
    driver.sample_and_save(config, str(tmp_path / "wd"))
  assert ("Sampling draws 4 class(es) the generator never trained (e.g. "
          "[4, 5, 6, 7]): its token files (config.data.path=") in caplog.text
  assert "--config.sample.classes='(0,1,2,3)'" in caplog.text
  caplog.clear()
  config.sample.classes = (0, 3)
  with caplog.at_level(logging.WARNING):
    driver.sample_and_save(config, str(tmp_path / "wd2"))
  assert "never trained" not in caplog.text
