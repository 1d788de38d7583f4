r"""CLI: convert an official PyTorch checkpoint into a Flax/Orbax one.

  python -m genvis_jax.convert --kind=rar --src=rar_b.bin \
      --config=configs/rar_b.py --dst=/ckpt/rar_b
  python -m genvis_jax.main --config=configs/rar_b.py --config.init_from=/ckpt/rar_b ...

Kinds: the modules of ``genvis_jax/convert/`` that define ``convert``
(``genvis_jax.convert.kinds()``). ``--src`` takes a comma-separated list
when a kind needs several files (lpips: torchvision vgg16 + LPIPS lin weights).
"""

from __future__ import annotations

import textwrap

from absl import app, flags, logging
from ml_collections import config_flags

from genvis_jax import cli
from genvis_jax import convert, errors, models

__doc__ = (__doc__ or "") + "\n" + textwrap.fill(   # pylint: disable=redefined-builtin
    f"Kinds here: {', '.join(convert.kinds())}.", 80) + "\n"

_KIND = flags.DEFINE_string(
    "kind", None, "Checkpoint kind: a module of genvis_jax/convert/ that "
    "defines convert (an unknown kind lists them).")
_SRC = flags.DEFINE_string("src", None, "Official checkpoint file(s), comma-separated.")
_DST = flags.DEFINE_string(
    "dst", None, "Output: Orbax directory (lpips, clip_vision, dinov2: an .npz "
    "file).")
_KEY = flags.DEFINE_string(
    "key", None, "Entry holding the weights in a training checkpoint "
    "(e.g. model, ema, state_dict); default: the flat dict or the only one.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --dst.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config whose config.model the checkpoint must fit.",
    lock_config=True)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments {argv[1:]}; flags are written "
             f"--name=value.\n{USAGE}", 2)
  cli.quiet_library_logs()
  config = _CONFIG.value
  if config is not None and "model" not in config:
    raise errors.ConfigError(
        "--config has no config.model (a demo config runs stages, each with "
        "its own): pass the config file of the model the checkpoint holds, "
        "e.g. --config=configs/maskgit_vqgan.py.")
  params = convert.convert_file(
      _KIND.value, _SRC.value, config.model if config is not None else None,
      _DST.value, key=_KEY.value, overwrite=_OVERWRITE.value, config=config)
  count = models.count_params(params)
  logging.info("Wrote %s (%d parameters, kind %s).", _DST.value, count, _KIND.value)
  print(f"Converted {_SRC.value} -> {_DST.value}: {count:,} parameters.")


USAGE = ("usage: python -m genvis_jax.convert --kind=K --src=FILE[,FILE] "
         "--dst=DIR [--config=configs/X.py] [--key=NAME] [--overwrite]")


if __name__ == "__main__":
  flags.mark_flags_as_required(["kind", "src", "dst"])
  app.run(cli.user_errors_exit(main), flags_parser=cli.flags_parser(USAGE))
