"""The README's commands parse as the CLI parses them: every
``python -m genvis_jax.main`` and ``launch/tpu_run.sh`` command of its shell
blocks loads its config with its ``--config.KEY=VALUE`` flags (keys that exist,
values of the right type, mode names that resolve), and every ``--config.KEY``
the prose names is a setting of some config. A renamed setting fails here
instead of in a new user's first command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from genvis_jax import modes
from tests import pipeline_common as pc

README = os.path.join(pc.ROOT, "README.md")
# Values of the shell variables the README sets (or asks the user to set).
SHELL_VARS = {"W": "/tmp/rar_local", "B": "gs://my-bucket",
              "GCS_BUCKET": "my-bucket"}


def _text() -> str:
  with open(README) as f:
    return f.read()


def _commands() -> list[tuple[int, str, list[str]]]:
  """(line number, program, argv after it) of each command in a ```bash
  block, continuation lines joined and comments dropped. The program is a
  ``python -m`` module or a ``launch/*.sh`` script."""
  text, out = _text(), []
  for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
    first_line = text.count("\n", 0, block.start(1)) + 1
    lines = block.group(1).split("\n")
    i = 0
    while i < len(lines):
      start, line = i, lines[i]
      while line.endswith("\\"):
        i += 1
        line = line[:-1] + " " + lines[i]
      i += 1
      words = shlex.split(line, comments=True)
      if "-m" in words:
        at = words.index("-m") + 1
      elif words and words[0].startswith("launch/"):
        at = 0
      else:
        continue
      out.append((first_line + start, words[at], words[at + 1:]))
  return out


def _config_args(argv: list[str]) -> list[str]:
  """The ``--config`` flags, with the shell variables expanded (for
  ``tpu_run.sh``: its own ``--config`` and the job's flags after ``--``)."""
  def expand(a):
    return re.sub(r"\$(\w+)", lambda m: SHELL_VARS[m.group(1)], a)
  return [expand(a) for a in argv
          if a.startswith("--config=") or a.startswith("--config.")]


COMMANDS = [c for c in _commands()
            if c[1] in ("genvis_jax.main", "launch/tpu_run.sh")
            and any(a.startswith("--config=configs/") and "NAME" not in a
                    for a in c[2])]
CONVERTS = [c for c in _commands() if c[1] == "genvis_jax.convert"]


def test_the_readme_has_commands_of_every_system():
  assert len(CONVERTS) >= 8
  configs = {a for _, _, argv in COMMANDS for a in argv
             if a.startswith("--config=")}
  for name in ("maskgit_vqgan", "rar_b", "rar_xl", "fqgan_dual_ds16",
               "far_b.py:dual", "eq_tokenizer", "eq_l", "demo_fqgan", "demo_eq"):
    assert any(name in c for c in configs), name


@pytest.mark.parametrize("line,prog,argv", COMMANDS,
                         ids=[f"line{line}" for line, _, _ in COMMANDS])
def test_command_parses(line, prog, argv, monkeypatch):
  monkeypatch.chdir(pc.ROOT)    # the commands run from the repository root
  config = pc.parse_config_args(_config_args(argv))
  modes.check_names(config)


@pytest.mark.parametrize("line,prog,argv", CONVERTS,
                         ids=[f"line{line}" for line, _, _ in CONVERTS])
def test_convert_command_parses(line, prog, argv, monkeypatch):
  from genvis_jax import convert
  monkeypatch.chdir(pc.ROOT)
  opts = dict(a[2:].split("=", 1) for a in argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  assert set(opts) - {a[2:].split("=")[0] for a in overrides} <= {
      "kind", "src", "dst", "key", "config"}, opts
  assert {"kind", "src", "dst"} <= set(opts), opts
  assert opts["kind"] in convert.kinds()
  if "config" in opts:   # with its overrides, as the command line applies them
    assert "model" in pc.parse_config_args([f"--config={opts['config']}",
                                            *overrides])


def _has(config, key: str) -> bool:
  node = config
  for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
    if part.startswith("["):
      index = int(part[1:-1])
      if not isinstance(node, (list, tuple)) or index >= len(node):
        return False
      node = node[index]
    elif hasattr(node, "keys") and part in node:
      node = node[part]
    else:
      return False
  return True


def test_settings_named_in_the_prose_exist(monkeypatch):
  monkeypatch.chdir(pc.ROOT)
  specs = {a.split("=", 1)[1] for _, _, argv in COMMANDS for a in argv
           if a.startswith("--config=configs/")}
  configs = [pc.parse_config_args([f"--config={s}"]) for s in sorted(specs)]
  configs += [pc.parse_config_args([f"--config=configs/{s}"]) for s in
              ("demo.py", "rar_b.py:runlocal", "eq_s.py:runlocal")]
  keys = set(re.findall(r"--config\.([\w.\[\]]+)", _text())) - {"a.b"}
  keys |= {k for k in re.findall(r"`config\.([\w.\[\]]+)`", _text())
           if not k.endswith(".py")}
  missing = [k for k in sorted(keys) if not any(_has(c, k) for c in configs)]
  assert not missing, missing


def test_micro_batching_is_not_promised_to_give_the_same_update():
  """Each micro-batch draws its own random numbers (train/step.py,
  ``fold_in(rng, i)``; tests/test_task_interface.py): every passage on
  ``micro_batches`` says the update matches in expectation, none that it is
  the same."""
  passages = [" ".join(p.split())
              for p in re.split(r"\n(?=\* )|\n\n", _text())
              if "micro_batches=K" in p]
  assert passages
  for p in passages:
    assert "in expectation" in p and "same update" not in p, p


# gpu_sample_eval.sh first checks that its input files exist.
LAUNCHES = [c for c in _commands()
            if c[1].startswith("launch/") and c[1] != "launch/gpu_sample_eval.sh"]


@pytest.mark.parametrize("line,prog,argv", LAUNCHES,
                         ids=[f"line{line}" for line, _, _ in LAUNCHES])
def test_launcher_accepts_the_command(line, prog, argv):
  """Each ``launch/*.sh`` command, with the README's environment, runs its
  checks and prints its gcloud commands (``DRY_RUN=1``: nothing runs)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("TPU_", "GCS_", "GCP_"))}
  env.update(DRY_RUN="1", TPU_NAME="rar-xl", TPU_ZONE="us-central2-b",
             **SHELL_VARS)
  argv = [re.sub(r"\$(\w+)", lambda m: SHELL_VARS[m.group(1)], a) for a in argv]
  r = subprocess.run(["bash", prog] + argv, cwd=pc.ROOT, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
