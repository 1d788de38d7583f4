"""Prepares a TFDS data set as the ArrayRecord files ``config.data.source=tfds``
reads, from Python: the ``tfds build`` command imports Apache Beam when it
starts (tensorflow-datasets 4.9), which the project does not install.

  python -m genvis_jax.data.prepare_tfds --name=imagenet2012 \\
      --manual_dir=/data/imagenet_tars --data_dir=/data/tfds

ImageNet is built from the two tars in ``--manual_dir``
(``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``); a data set TFDS
downloads itself is downloaded then (this is the one command that may).
"""

from __future__ import annotations

import argparse


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> str:
  """Builds ``name`` (a TFDS catalogue name, ``name/config`` or
  ``name:version``) in ArrayRecord format under ``data_dir``; returns the
  folder written (``data_dir/name/version``). A data set already prepared
  there is left as it is. Raises ``ValueError`` for one prepared there in
  another format (TFDS's default, TFRecord: TFDS keeps one format per
  folder), and what TFDS raises (e.g. the manual files missing from
  ``manual_dir``)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import tfds_source  # pylint: disable=import-outside-toplevel
  existing = tfds.builder(name, data_dir=data_dir)
  if existing.is_prepared() and not tfds_source.is_array_record(existing):
    raise ValueError(
        f"it is already prepared in {existing.data_dir} as "
        f"{existing.info.file_format}, and TFDS keeps one format per folder. "
        f"Give another --data_dir (then set config.data.path to it), or "
        f"delete {existing.data_dir} first.")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return str(builder.data_dir)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TFDS data set, e.g. imagenet2012")
  p.add_argument("--data_dir", required=True,
                 help="where to write it (then config.data.path)")
  p.add_argument("--manual_dir", default=None,
                 help="the downloaded files a manual data set is built from")
  args = p.parse_args(argv)
  try:
    where = prepare(args.name, args.data_dir, args.manual_dir)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS's message says what is missing (a name, the manual files); its
    # traceback would bury it.
    raise SystemExit(f"Error: preparing {args.name!r} in {args.data_dir} "
                     f"failed: {type(e).__name__}: {e}") from e
  print(f"Prepared {where}. Train on it with --config.data.source=tfds "
        f"--config.data.name={args.name.split(':')[0]} "
        f"--config.data.path={args.data_dir}")


if __name__ == "__main__":
  main()
