"""launch/*.sh: syntax, --help, required flags, and the commands --dry-run prints.

Nothing here calls gcloud: --dry-run / DRY_RUN=1 prints each command instead.
worker_start.sh (what runs on each TPU worker) is run for real with a fake python.
"""

import os
import pathlib
import re
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))
ENTRY = [s for s in SCRIPTS if s != "common.sh"]

# Flags each script must list in --help.
FLAGS = {
    "tpu_create.sh": ["--name", "--zone", "--accelerator-type", "--version", "--spot",
                      "--preemptible", "--project"],
    "tpu_setup.sh": ["--name", "--zone", "--git-url", "--venv", "--extras"],
    "tpu_run.sh": ["--name", "--zone", "--config", "--workdir", "--bucket",
                   "--run-name", "--stop"],
    "tpu_logs.sh": ["--name", "--zone", "--worker", "--lines", "--run-name", "--config"],
    "tpu_copy_ckpt.sh": ["--workdir", "--bucket", "--run-name", "--config", "--dest",
                         "--step", "--tool"],
    "tpu_delete.sh": ["--name", "--zone", "--yes"],
    "gpu_sample_eval.sh": ["--config", "--workdir", "--rar-src", "--tokenizer-src",
                           "--inception-src", "--reference", "--num-samples"],
    "worker_start.sh": ["--run-name", "--log-dir", "--python", "--stop"],
}

# A clean environment: no TPU_* / GCS_* defaults leaking in from the caller.
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("TPU_", "GCS_", "GENVIS_", "GCP_", "DRY_RUN", "JAX_C",
                            "JAX_N", "JAX_P"))}


def sh(script, *args, env=None, cwd=None):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                        text=True, env={**ENV, **(env or {})}, cwd=cwd, timeout=60)


def commands(out: str) -> list[str]:
  return [l[2:] for l in out.splitlines() if l.startswith("+ ")]


def test_every_script_is_listed_and_parses():
  assert set(ENTRY) == set(FLAGS), "add new launch scripts to FLAGS"
  for name in SCRIPTS:
    r = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    text = (LAUNCH / name).read_text()
    assert "set -euo pipefail" in text, name


@pytest.mark.parametrize("name", ENTRY)
def test_help_lists_flags(name):
  r = sh(name, "--help")
  assert r.returncode == 0, r.stderr
  for flag in FLAGS[name] + ["--dry-run", "--help"]:
    assert re.search(rf"(^|\s){re.escape(flag)}(=VALUE)?\s", r.stdout), (name, flag)


@pytest.mark.parametrize("name,args,missing", [
    ("tpu_create.sh", ["--zone=z", "--accelerator-type=v4-8"], "--name"),
    ("tpu_create.sh", ["--name=n", "--zone=z"], "--accelerator-type"),
    ("tpu_setup.sh", ["--name=n"], "--zone"),
    ("tpu_run.sh", ["--name=n", "--zone=z", "--config=configs/rar_b.py"], "--workdir"),
    ("tpu_logs.sh", ["--zone=z"], "--name"),
    ("tpu_copy_ckpt.sh", ["--dest=x"], "--workdir"),
    ("tpu_delete.sh", ["--name=n"], "--zone"),
    ("gpu_sample_eval.sh", ["--rar-ckpt=a", "--tokenizer-ckpt=b"], "--workdir"),
    ("gpu_sample_eval.sh", ["--workdir=w", "--rar-ckpt=a", "--tokenizer-ckpt=b"],
     "--inception"),
    ("worker_start.sh", [], "--run-name"),
])
def test_missing_required_flag_fails_clearly(name, args, missing):
  r = sh(name, *args, "--dry-run")
  assert r.returncode != 0
  assert missing in r.stderr and "required" in r.stderr, r.stderr
  assert not commands(r.stdout), "nothing may run after a bad argument"


@pytest.mark.parametrize("name,args,message", [
    ("tpu_create.sh", ["--name=n", "--zone=z", "--accelerator-type=v4"],
     "GENERATION-CORES"),
    ("tpu_create.sh", ["--name=n", "--zone=z", "--accelerator-type=v4-8", "--spot",
                       "--preemptible"], "one of --spot and --preemptible"),
    ("tpu_create.sh", ["--name=n", "--bogus=1"], "unknown flag --bogus"),
    ("tpu_run.sh", ["--name=n", "--zone=z", "--config=configs/nope.py", "--bucket=b"],
     "no file configs/nope.py"),
    ("tpu_run.sh", ["--name=n", "--zone=z", "--config=configs/rar_b.py",
                    "--workdir=/tmp/x"], "gs:// URL"),
    ("tpu_copy_ckpt.sh", ["--workdir=gs://b/r", "--tool=rsync"], "choose gcloud"),
    ("tpu_logs.sh", ["--name=n", "--zone=z", "--worker=x"], "--worker=x"),
    ("tpu_delete.sh", ["--name"], "needs a value"),
])
def test_bad_values_fail_clearly(name, args, message):
  r = sh(name, *args, "--dry-run")
  assert r.returncode != 0 and message in r.stderr, r.stderr


def test_create_dry_run():
  r = sh("tpu_create.sh", "--name=rar-xl", "--zone=us-central2-b",
         "--accelerator-type=v4-256", "--spot", "--dry-run",
         env={"GCP_PROJECT": "proj"})
  assert r.returncode == 0, r.stderr
  [cmd] = commands(r.stdout)
  assert cmd.startswith("gcloud compute tpus tpu-vm create rar-xl ")
  for part in ("--zone=us-central2-b", "--accelerator-type=v4-256",
               "--version=tpu-ubuntu2204-base", "--spot", "--project=proj"):
    assert part in shlex.split(cmd), part
  # Env-var defaults and the version chosen from the generation.
  r = sh("tpu_create.sh", env={"TPU_NAME": "p", "TPU_ZONE": "europe-west4-b",
                               "TPU_ACCELERATOR_TYPE": "v5litepod-256", "DRY_RUN": "1"})
  [cmd] = commands(r.stdout)
  assert "--version=v2-alpha-tpuv5-lite" in cmd and "--zone=europe-west4-b" in cmd
  assert "--spot" not in cmd


def test_setup_dry_run_copies_installs_checks():
  r = sh("tpu_setup.sh", "--name=n", "--zone=z", "--dry-run")
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  assert any("tar czf" in c for c in cmds)
  scp = [c for c in cmds if " scp " in c]
  assert scp and "--worker=all" in scp[0] and "--zone=z" in scp[0]
  ssh = [c for c in cmds if " ssh n " in c]
  assert any("pip install" in c and ".[tpu]" in c for c in ssh)
  assert any("python3.11" in c for c in ssh), "TPU images ship python 3.10"
  assert all("--worker=all" in c for c in ssh)


def test_setup_refuses_a_folder_that_is_not_the_checkouts_own():
  """Setup replaces --remote-dir: the home folder, the root or a top-level
  folder would be replaced whole. A folder with a space is one word on the
  workers."""
  for folder in ("", ".", "./", ".//", "/", "/opt", "~", "~/.", "~//", "$HOME",
                 "$HOME//", "${HOME}/", '"$HOME"', "~root", "a/.."):
    r = sh("tpu_setup.sh", "--name=n", "--zone=z", "--dry-run",
           f"--remote-dir={folder}")
    assert r.returncode != 0 and "the checkout's own folder" in r.stderr, folder
  # Trailing slashes go before the quotes (inside them, $dir.new was a
  # folder inside the checkout).
  r = sh("tpu_setup.sh", "--name=n", "--zone=z", "--dry-run",
         "--remote-dir=my code//")
  assert r.returncode == 0, r.stderr
  assert "mkdir -p \"$HOME\"/'\\''my code'\\''.new" in r.stdout, r.stdout


def test_run_dry_run_has_config_workdir_and_overrides():
  r = sh("tpu_run.sh", "--name=pod", "--zone=us-east5-a", "--config=configs/rar_xl.py",
         "--bucket=my-bucket", "--dry-run", "--",
         "--config.data.path=gs://my-bucket/tokens/train-*",
         "--config.mesh.shape.fsdp=8")
  assert r.returncode == 0, r.stderr
  check, cmd = commands(r.stdout)   # every worker is asked first
  assert "worker_start.sh" in check and "--start-check=30 --check" in check
  assert "ssh pod --worker=all" in cmd and "--zone=us-east5-a" in cmd
  for part in ("worker_start.sh", "--config=configs/rar_xl.py",
               "--workdir=gs://my-bucket/runs/rar_xl", "--run-name=rar_xl",
               "gs://my-bucket/tokens/train-*", "--config.mesh.shape.fsdp=8",
               "--compilation-cache=gs://my-bucket/runs/rar_xl/jax_cache"):
    assert part in cmd, part
  # A bucket given with a trailing slash: the same workdir.
  r = sh("tpu_run.sh", "--name=pod", "--zone=z", "--config=configs/rar_xl.py",
         "--bucket=gs://my-bucket/", "--compilation-cache=off", "--dry-run")
  cmd = commands(r.stdout)[-1]
  assert "--workdir=gs://my-bucket/runs/rar_xl'" in cmd
  assert "--compilation-cache= " in cmd
  r = sh("tpu_run.sh", "--name=pod", "--zone=z", "--run-name=rar_xl", "--stop",
         "--dry-run")
  [cmd] = commands(r.stdout)
  assert "worker_start.sh" in cmd and "--stop" in cmd


def test_logs_copy_delete_dry_run():
  [cmd] = commands(sh("tpu_logs.sh", "--name=n", "--zone=z", "--worker=3",
                      "--run-name=r", "--dry-run").stdout)
  assert "--worker=3" in cmd and "tail -n 100 -F" in cmd and "genvis_logs/r.log" in cmd
  cmds = commands(sh("tpu_copy_ckpt.sh", "--bucket=bk", "--run-name=r",
                     "--step=5000", "--dest=/tmp/ck", "--dry-run").stdout)
  assert cmds[-1] == "gcloud storage cp -r gs://bk/runs/r/checkpoints/5000 /tmp/ck/checkpoints/"
  cmds = commands(sh("tpu_copy_ckpt.sh", "--workdir=gs://bk/x", "--tool=gsutil",
                     "--step=all", "--dry-run").stdout)
  assert cmds[-1] == "gsutil -m cp -r 'gs://bk/x/checkpoints/[0-9]*' checkpoints/x/checkpoints/"
  cmds = commands(sh("tpu_copy_ckpt.sh", "--workdir=gs://bk/x", "--dry-run").stdout)
  # The newest finished step (a save cut short has no commit file).
  assert cmds[0] == "gcloud storage ls 'gs://bk/x/checkpoints/*/commit_success.txt'"
  assert cmds[-1] == "gcloud storage cp -r gs://bk/x/checkpoints/NEWEST checkpoints/x/checkpoints/"
  [cmd] = commands(sh("tpu_delete.sh", "--name=n", "--zone=z", "--yes",
                      "--dry-run").stdout)
  assert cmd == "gcloud compute tpus tpu-vm delete n --quiet --zone=z"


TPU = {"TPU_NAME": "pod", "TPU_ZONE": "z", "GCS_BUCKET": "bk", "DRY_RUN": "1"}


def run_name_of(script, *args):
  """The run name (and workdir, where there is one) a script's dry run uses."""
  r = sh(script, *args, env=TPU)
  assert r.returncode == 0, r.stderr
  cmd = commands(r.stdout)[-1]
  if script == "tpu_logs.sh":
    return re.search(r"genvis_logs/(\S+)\.log", cmd).group(1), None
  if script == "tpu_copy_ckpt.sh":
    workdir = re.search(r"(gs://\S+)/checkpoints/", cmd).group(1)
    return workdir.rsplit("/", 1)[1], workdir
  name = re.search(r"--run-name=(\S+)", cmd).group(1)
  workdir = re.search(r"--workdir=([^\s']+)", cmd)
  return name, workdir and workdir.group(1)


# A config argument is part of the default run name: another model, another batch
# or a smoke test of the same file gets its own workdir (never resumes another's).
RUN_NAMES = {
    "configs/rar_xl.py": "rar_xl",
    "configs/far_b.py:dual": "far_b_dual",
    "configs/far_b.py:triple": "far_b_triple",
    "configs/far_b.py:dual,batch=512": "far_b_dual_batch512",
    "configs/eq_tokenizer.py:stage2": "eq_tokenizer_stage2",
    "configs/rar_xl.py:runlocal": "rar_xl_runlocal",
    "configs/far_b.py:": "far_b",
}


@pytest.mark.parametrize("config,name", RUN_NAMES.items())
def test_default_run_name_includes_the_config_argument(config, name):
  assert re.fullmatch(r"[A-Za-z0-9_-]+", name)
  assert run_name_of("tpu_run.sh", f"--config={config}") == (name, f"gs://bk/runs/{name}")
  # The scripts that find the run again name it the same way from --config.
  assert run_name_of("tpu_run.sh", "--stop", f"--config={config}")[0] == name
  assert run_name_of("tpu_logs.sh", f"--config={config}")[0] == name
  assert run_name_of("tpu_copy_ckpt.sh", f"--config={config}") == (
      name, f"gs://bk/runs/{name}")
  r = sh("tpu_copy_ckpt.sh", f"--config={config}", env=TPU)
  assert f"copied to checkpoints/{name} " in r.stderr


def test_run_names_differ_and_run_name_overrides():
  configs = ["configs/far_b.py:dual", "configs/far_b.py:triple",
             "configs/far_b.py:dual,batch=512", "configs/rar_xl.py",
             "configs/far_b.py:dual,batch=5,12"]
  workdirs = [run_name_of("tpu_run.sh", f"--config={c}")[1] for c in configs]
  assert len(set(workdirs)) == len(configs), workdirs
  # Characters outside [A-Za-z0-9_-] become '_' ('=' is dropped).
  assert run_name_of("tpu_run.sh", "--config=configs/far_b.py:dual,lr=0.5 x")[0] == (
      "far_b_dual_lr0_5_x")
  # --run-name wins over the name from --config, in every script.
  for script, args in [("tpu_run.sh", []), ("tpu_run.sh", ["--stop"]),
                       ("tpu_logs.sh", []), ("tpu_copy_ckpt.sh", [])]:
    got = run_name_of(script, *args, "--config=configs/far_b.py:dual", "--run-name=mine")
    assert got[0] == "mine", (script, got)
  assert run_name_of("tpu_run.sh", "--config=configs/far_b.py:dual", "--run-name=mine",
                     "--workdir=gs://x/y")[1] == "gs://x/y"
  # A run of another mode (-- --config.mode=sample) is found as tpu_run.sh
  # names it: tpu_logs.sh and tpu_copy_ckpt.sh followed the training run's.
  for script in ("tpu_run.sh", "tpu_logs.sh", "tpu_copy_ckpt.sh"):
    got = run_name_of(script, "--config=configs/rar_xl.py", "--",
                      "--config.mode=sample")
    assert got[0] == "rar_xl_sample", (script, got)
  # Without either, tpu_logs.sh follows the latest run.
  assert run_name_of("tpu_logs.sh")[0] == "latest"
  r = sh("tpu_logs.sh", "--run-name=a/b", env=TPU)
  assert r.returncode != 0 and "--run-name=a/b" in r.stderr
  r = sh("tpu_copy_ckpt.sh", env=TPU)
  assert r.returncode != 0 and "--config" in r.stderr and not commands(r.stdout)


@pytest.mark.parametrize("args,name,output", [
    ((), "rar_xl", "checkpoints: gs://bk/runs/rar_xl/checkpoints"),
    (("--config.mode", "pretokenize", "--config.pretokenize.output=/tmp/t/tr"),
     "rar_xl_pretokenize", "tokens: /tmp/t/tr-* on each worker's disk"),
    (("--config.mode=sample",), "rar_xl_sample",
     "samples: gs://bk/runs/rar_xl_sample/samples.npz"),
    (("--config.mode=sample", "--config.mode=evaluate"), "rar_xl_evaluate",
     "metrics: gs://bk/runs/rar_xl_evaluate/metrics.json"),
])
def test_tpu_run_names_each_mode_and_says_where_it_writes(args, name, output):
  """A mode other than train runs under its own name (log, workdir): sampling
  beside a training run neither replaces its log nor is refused as running."""
  r = sh("tpu_run.sh", "--config=configs/rar_xl.py", "--", *args, env=TPU)
  assert r.returncode == 0, r.stderr
  assert f"--run-name={name} " in commands(r.stdout)[-1]
  assert f"--run-name={name}; {output}" in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.parametrize("output", [None, "gs://bk/tokens/train"])
def test_tpu_run_refuses_pretokenizing_to_the_bucket(output):
  """The token writer writes local files: without a local output (the
  default is <workdir>/tokens, the bucket) nothing is started."""
  args = ["--config.mode=pretokenize"] + (
      [f"--config.pretokenize.output={output}"] if output else [])
  r = sh("tpu_run.sh", "--config=configs/rar_xl.py", "--", *args, env=TPU)
  assert r.returncode != 0 and not commands(r.stdout)
  assert "--config.pretokenize.output=/tmp/tokens/NAME" in r.stderr


def _readme_launches():
  """(script, argv) of each launch/*.sh command in the README's bash blocks."""
  text = (LAUNCH.parent / "README.md").read_text()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in re.sub(r"\\\n", " ", block).split("\n"):
      words = shlex.split(line.replace("$B", "gs://bk").replace("$GCS_BUCKET", "bk"),
                          comments=True)
      if words and words[0].startswith("launch/"):
        out.append((words[0][len("launch/"):], words[1:]))
  return out


def test_readme_names_the_runs_its_commands_start():
  """A run the README copies, follows, stops or initialises from is one that a
  README tpu_run.sh command starts, under the name the launcher gives it."""
  launches = _readme_launches()
  started, used = set(), []
  for script, argv in launches:
    own = argv[:argv.index("--")] if "--" in argv else argv
    if script == "tpu_run.sh" and "--stop" not in own:
      started.add(run_name_of(script, *own)[0])
      used += [a.split("/runs/", 1)[1].split("/")[0] for a in argv if "/runs/" in a]
    elif script in ("tpu_run.sh", "tpu_copy_ckpt.sh", "tpu_logs.sh") and any(
        a.startswith(("--run-name=", "--config=")) for a in own):
      used.append(run_name_of(script, *own)[0])
  assert {"rar_xl", "far_b_dual", "eq_tokenizer", "eq_tokenizer_stage2"} <= started
  assert used and set(used) <= started, (sorted(used), sorted(started))


def test_gpu_sample_eval_dry_run(tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  for name in ("rar_xl.bin", "w/vq.bin", "w/inc.pth", "w/ref.npz"):
    (tmp_path / name).write_text("")
  args = ["--workdir=out", "--rar-src=rar_xl.bin", f"--tokenizer-src={w}/vq.bin",
          f"--inception-src={w}/inc.pth", f"--reference={w}/ref.npz",
          "--num-samples=1000", "--batch-size=64", "--dry-run"]
  # A missing input is named before anything installs, converts or samples.
  bad = sh("gpu_sample_eval.sh", *args[:-4], f"--reference={w}/typo.npz",
           *args[-3:], cwd=tmp_path)
  assert bad.returncode != 0 and f"--reference={w}/typo.npz: no such file" in (
      bad.stderr), bad.stderr
  assert not commands(bad.stdout)
  r = sh("gpu_sample_eval.sh", *args, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  cmds = commands(r.stdout)
  wd = f"{tmp_path}/out"   # relative paths resolve against the caller's directory
  # Compiled programs persist in the workdir unless the caller chose a place.
  assert f"compiled programs cached in {wd}/jax_cache" in r.stderr, r.stderr
  own = sh("gpu_sample_eval.sh", *args, cwd=tmp_path,
           env={"JAX_COMPILATION_CACHE_DIR": f"{tmp_path}/cache"})
  assert f"compiled programs cached in {tmp_path}/cache\n" in own.stderr
  assert any("pip install" in c and ".[gpu]" in c for c in cmds)
  conv = [c for c in cmds if "genvis_jax.convert" in c]
  assert f"--src={tmp_path}/rar_xl.bin" in conv[0] and "--config=configs/rar_xl.py" in conv[0]
  assert "--kind=maskgit_vqgan" in conv[1] and "configs/maskgit_vqgan.py" in conv[1]
  assert "--kind=inception" in conv[2]
  [sample] = [c for c in cmds if "--config.mode=sample" in c]
  for part in (f"--workdir={wd}/samples", f"--config.init_from={wd}/weights/rar",
               f"--config.tokenizer.checkpoint={wd}/weights/maskgit_vqgan",
               "--config.sample.num_samples=1000", "--config.sample.batch_size=64"):
    assert part in shlex.split(sample), part
  [ev] = [c for c in cmds if "--config.mode=evaluate" in c]
  for part in ("--config.evaluate.kind=generation", f"--config.evaluate.reference={w}/ref.npz",
               f"--config.evaluate.samples={wd}/samples/samples.npz"):
    assert part in shlex.split(ev), part
  assert f"metrics: {wd}/eval/metrics.json" in r.stdout
