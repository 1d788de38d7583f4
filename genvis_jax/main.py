"""Entry point: ``python -m genvis_jax.main --config=configs/X.py --workdir=DIR``.

Only parses flags and dispatches on ``config.mode`` to importable functions:
train | demo | sample | evaluate | pretokenize. Override any config field with
``--config.a.b=value``.

User errors (bad or missing flags, a config file that fails to load, a
``UserError`` raised by the library: missing data, mismatched checkpoints,
damaged weight files, a batch that does not split across devices) print one
``Error: ...`` line on stderr, no traceback, and exit non-zero (2 for flags, 1
otherwise). ``--verbose`` (or ``GENVIS_VERBOSE=1``) keeps the traceback and
logs the whole config at start-up.

``--config=configs/NAME.py:ARG`` passes ARG (comma-separated) to the config:
``runlocal`` shrinks a paper config to the embedded demo data on a 2-core CPU
(minutes), FAR takes its tokenizer's variant first (``far_b.py:dual`` or
``triple``), FQGAN tokenizers a precision (``bf16`` / ``fp32``), some a size
(``batch=256``), ``eq_tokenizer.py:stage2`` its second stage,
``eq_demo.py:tokenizer`` / ``:generator`` a demo stage, and ``smoke`` a demo
of a few steps; an argument a config does not take is refused with the list
of those it does. The configs in configs/ (the README walks each chain):
"""

from __future__ import annotations

from genvis_jax.core import interrupts

if __name__ == "__main__":   # the command line, before jax is imported: a
  # Ctrl-C during the imports ends it at once (an import of this module
  # leaves the importer's handlers alone).
  interrupts.note()

import os  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags

from genvis_jax import cli
from genvis_jax import cpu_malloc
from genvis_jax import modes
from genvis_jax.core import preemption

__doc__ = (__doc__ or "") + cli.config_catalogue(   # pylint: disable=redefined-builtin
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 "configs")) + "\n"

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli)   # --verbose in --help
config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, images.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = ("usage: python -m genvis_jax.main --config=configs/NAME.py[:ARG] "
         "--workdir=DIR [--config.KEY=VALUE ...] [--verbose]")


@cli.user_errors_exit
def main(argv):
  if len(argv) > 1:
    cli.fail(f"Unexpected arguments {argv[1:]}; flags are written "
             f"--name=value.\n{USAGE}", 2)
  interrupts.started()   # Ctrl-C raises from here on (see interrupts.py)
  config = FLAGS.config
  modes.check_names(config)
  modes.check_overrides(
      config, config_flags.get_override_values(FLAGS["config"]))
  preemption.exit_on_second_interrupt = True
  from genvis_jax.train import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize()
  cli.quiet_library_logs()
  if cli.verbose():
    logging.info("mode=%s config:\n%s", config.mode, config)
  else:   # a dump of the whole config would bury an early error
    logging.info("mode=%s workdir=%s (--verbose logs the whole config)",
                 config.mode, FLAGS.workdir)
  modes.run(config, FLAGS.workdir)


parse_flags = cli.flags_parser(USAGE)


if __name__ == "__main__":
  cpu_malloc.tune()   # before any thread allocates; see cpu_malloc.py
  app.run(main, flags_parser=parse_flags)
