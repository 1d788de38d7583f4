"""Command-line overrides judged before anything runs: an unknown key is
named by the override that holds it, and data keys nothing would read are
refused (``cli.unknown_key_message``, ``modes.check_overrides``)."""

import os

import pytest

from configs import demo
from genvis_jax import cli
from genvis_jax import modes
from genvis_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_keys_are_named_by_their_override():
  """The whole override, wherever its unknown part is; a demo config's
  top-level key points at its stages."""
  argv = ["main", "--config=configs/rar_b.py", "--config.trian.num_steps=5"]
  assert cli.unknown_key_message(KeyError("'trian'"), argv).startswith(
      "Unknown config key --config.trian.num_steps: an override must name")
  # The override whose path the config lacks, not an earlier one ending in
  # the same key (RAR's config has train.num_steps, no sample.num_steps).
  argv = ["main", "--config=configs/rar_b.py:runlocal",
          "--config.train.num_steps=30", "--config.sample.num_steps=4"]
  assert cli.unknown_key_message(KeyError("'num_steps'"), argv).startswith(
      "Unknown config key --config.sample.num_steps: ")
  argv = ["main", "--config=configs/fqgan_dual_ds16.py",
          "--config.teachers[0].path=x", "--config.data.path=y",
          "--config.teachers[0].kwargs.path=z"]
  assert cli.unknown_key_message(KeyError("'path'"), argv).startswith(
      "Unknown config key --config.teachers[0].kwargs.path: ")
  argv = ["main", "--config=configs/demo_fqgan.py", "--config.mode=evaluate",
          "--config.evaluate.samples=x"]
  message = cli.unknown_key_message(KeyError("'evaluate'"), argv)
  assert message.startswith("Unknown config key --config.evaluate.samples")
  assert "A demo config runs stages: their settings are under " in message
  # The example is a stage of that demo holding the key (demo_eq has no
  # "samples" stage, which the example named), or the demo's stages.
  demo_eq = os.path.join(REPO, "configs", "demo_eq.py")
  message = cli.unknown_key_message(KeyError("'sample'"), [
      "main", f"--config={demo_eq}", "--config.sample.num_samples=4"])
  assert ("(e.g. --config.stages.eq_generator.sample.num_samples, "
          "--config.stages.samples_wide.sample.num_samples)") in message
  message = cli.unknown_key_message(KeyError("'samples'"), [
      "main", f"--config={demo_eq}",
      "--config.stages.samples.sample.num_samples=4"])
  assert message.endswith(
      " This demo's stages: eq_generator, eq_tokenizer, samples_wide.")


def test_config_paths_of_both_flag_forms():
  """``--config PATH`` (absl's space form) is checked as ``--config=PATH``."""
  assert cli._config_paths(["main", "--config", "configs/x.py:runlocal",   # pylint: disable=protected-access
                            "--workdir=/w", "--config=configs/y.py",
                            "--config.mode=sample", "--config"]) == [
                                "configs/x.py", "configs/y.py"]


def test_overrides_that_nothing_reads_are_refused():
  """A data key of the other kind of source, given on the command line;
  the config file's own values (its defaults) and read keys pass."""
  from configs import maskgit_vqgan, rar_b   # pylint: disable=import-outside-toplevel
  tokens, images = rar_b.get_config("runlocal"), maskgit_vqgan.get_config(
      "runlocal")
  modes.check_overrides(tokens, ["data.path", "data.verify_checksums",
                                 "train.num_steps"])
  modes.check_overrides(images, ["data.random_flip", "data.to_float"])
  with pytest.raises(UserError, match=r"--config.data.crop_min_frac, "
                     r"--config.data.to_float would be read by nothing"):
    modes.check_overrides(tokens, ["data.crop_min_frac", "data.path",
                                   "data.to_float"])
  with pytest.raises(UserError, match=r"--config.data.verify_checksums would "
                     r"be read by nothing: config.data.source='demo' reads "
                     r"images: verify_checksums is read for token files"):
    modes.check_overrides(images, ["data.verify_checksums"])
  # An image folder's file settings on other image sources (a TFDS data set
  # holds decoded records), in config.pretokenize.data too.
  folder, encodes_folder = images, rar_b.get_config("runlocal")
  folder.data.source = encodes_folder.pretokenize.data.source = "image_folder"
  modes.check_overrides(folder, ["data.exif_transpose", "data.extensions"])
  modes.check_overrides(encodes_folder, ["pretokenize.data.exif_transpose"])
  with pytest.raises(UserError, match=r"--config.data.exif_transpose would be "
                     r"read by nothing: config.data.source='tfds' reads "
                     r"images: exif_transpose is read for image folders"):
    modes.check_overrides(maskgit_vqgan.get_config(), ["data.exif_transpose"])
  with pytest.raises(UserError, match=r"--config.pretokenize.data.extensions, "
                     r"--config.pretokenize.data.verify_checksums would be "
                     r"read by nothing: config.pretokenize.data.source='tfds'"):
    modes.check_overrides(rar_b.get_config(), [
        "pretokenize.data.extensions", "pretokenize.data.verify_checksums",
        "pretokenize.data.image_size"])
  # A TFDS data set's name, on a TFDS source alone.
  modes.check_overrides(maskgit_vqgan.get_config(), ["data.name"])
  modes.check_overrides(rar_b.get_config(), ["pretokenize.data.name"])
  with pytest.raises(UserError, match=r"--config.data.name would be read by "
                     r"nothing: config.data.source='image_folder' reads images: "
                     r"name is read for TFDS data sets \(source='tfds'\) alone"):
    modes.check_overrides(folder, ["data.name", "data.extensions"])
  with pytest.raises(UserError, match=r"--config.data.name, --config.data."
                     r"random_flip would be read by nothing: config.data.source="
                     r"'tokens' reads pre-tokenized codes, whose crops .*; name "
                     r"is read for TFDS data sets"):
    modes.check_overrides(tokens, ["data.name", "data.random_flip",
                                   "data.verify_checksums"])
  stages = demo.get_config()   # the RAR stage trains on tokens
  modes.check_overrides(stages, ["stages.tokenizer.data.random_flip",
                                 "stages.rar.pretokenize.data.random_flip"])
  with pytest.raises(UserError, match=r"--config.stages.rar.data.random_flip "
                     r"would be read by nothing: config.stages.rar.data.source"
                     r"='tokens'"):
    modes.check_overrides(stages, ["stages.rar.data.random_flip"])
  # Pre-tokenizing reads config.pretokenize.data: a generator's config.data
  # (its token files) is read for none of its keys (--config.data.path
  # encoded the demo images instead of the folder it named).
  encodes = rar_b.get_config("runlocal")
  encodes.mode = "pretokenize"
  with pytest.raises(UserError, match=r"^--config.data.path, --config.data."
                     r"image_size would be read by nothing: config.mode="
                     r"pretokenize encodes the images of config.pretokenize."
                     r"data .* Set them under --config.pretokenize.data"):
    modes.check_overrides(encodes, ["mode", "data.path", "data.image_size",
                                    "pretokenize.data.path"])
  modes.check_overrides(encodes, ["data.source", "pretokenize.data.path",
                                  "mode", "tokenizer.checkpoint",
                                  "tokenizer.model.image_size",
                                  "model.metadata.x"])
  # Pre-tokenizing reads config.pretokenize.data.
  with pytest.raises(UserError, match=r"--config.stages.pretokenize.data."
                     r"center_crop would be read by nothing: config.stages."
                     r"pretokenize.mode=pretokenize encodes the images of "
                     r"config.stages.pretokenize.pretokenize.data"):
    modes.check_overrides(stages, ["stages.pretokenize.data.center_crop"])
  # Also a key its config.data's own source would read (an image folder's,
  # a TFDS data set's): the job encodes config.pretokenize.data's images.
  for source, key in (("image_folder", "extensions"), ("tfds", "name")):
    stages.stages.pretokenize.data.source = source
    with pytest.raises(UserError, match=rf"--config.stages.pretokenize.data."
                       rf"{key} would be read by nothing: config.stages."
                       r"pretokenize.mode=pretokenize encodes"):
      modes.check_overrides(stages, [f"stages.pretokenize.data.{key}"])
