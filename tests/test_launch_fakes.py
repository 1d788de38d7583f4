"""launch/*.sh run for real on one machine: worker_start.sh (what runs on
each TPU worker) with a fake python, and tpu_run.sh / tpu_setup.sh /
tpu_copy_ckpt.sh against a stand-in gcloud whose ssh runs the command under
a fake $HOME. (Flags, --help and --dry-run commands: test_launch.py.)"""

import os
import pathlib
import subprocess
import time

import pytest

from tests import proc_stat, process_running
from tests.test_launch import ENV, LAUNCH, commands, sh


def test_worker_start_runs_in_background_and_stops(tmp_path):
  """The on-worker starter for real: nohup'd process, log, pid, distributed env."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\n"
                  "echo \"ARGS $*\"; echo \"COORD $JAX_COORDINATOR_ADDRESS "
                  "$JAX_NUM_PROCESSES $JAX_PROCESS_ID\"; "
                  "echo \"CACHE $JAX_COMPILATION_CACHE_DIR\"; exec sleep 30\n")
  fake.chmod(0o755)
  env = {"TPU_WORKER_ENDPOINTS": "w-0:0:10.1.0.2,w-1:1:10.1.0.3,w-2:2:10.1.0.4",
         "TPU_WORKER_NUMBER": "2"}
  args = ["--run-name=r1", f"--log-dir={tmp_path}/logs", f"--python={fake}",
          "--start-check=1"]
  r = sh("worker_start.sh", *args, "--", "--config=configs/rar_b.py",
         "--config.data.path=gs://b/t-*", env=env)
  assert r.returncode == 0, r.stderr
  pid = int((tmp_path / "logs" / "r1.pid").read_text().split()[0])
  try:
    log = tmp_path / "logs" / "latest.log"
    for _ in range(100):
      if log.exists() and "CACHE" in log.read_text():
        break
      time.sleep(0.05)
    text = log.read_text()
    assert "ARGS -m genvis_jax.main --config=configs/rar_b.py --config.data.path=gs://b/t-*" in text
    assert "COORD 10.1.0.2:8476 3 2" in text
    assert f"CACHE {os.path.expanduser('~')}/jax_cache\n" in text
    again = sh("worker_start.sh", *args, env=env)
    assert again.returncode != 0 and "already running" in again.stderr
    assert sh("worker_start.sh", *args, "--stop", env=env).returncode == 0
    for _ in range(100):
      if not process_running(pid):
        break
      time.sleep(0.05)
    else:
      pytest.fail("worker_start.sh --stop left the process running")
  finally:
    subprocess.run(["kill", str(pid)], capture_output=True)
  # A run gone before its start time was read still gets one: an empty one
  # trusted the pid alone, which a later process may take.
  for name in ("g1", "g2", "g3", "g4", "g5"):
    sh("worker_start.sh", f"--run-name={name}", f"--log-dir={tmp_path}/logs",
       "--python=/nonexistent/python", "--start-check=0", env=env)
    fields = (tmp_path / "logs" / f"{name}.pid").read_text().split()
    assert len(fields) == 2, fields
  # A single host exports nothing: jax needs no distributed set-up there.
  r = sh("worker_start.sh", "--run-name=r2", f"--log-dir={tmp_path}/logs",
         "--dry-run", "--", "--config=c.py", env={"TPU_WORKER_ENDPOINTS": ""})
  [cmd] = commands(r.stdout)
  assert "JAX_COORDINATOR_ADDRESS" not in cmd and "--config=c.py" in cmd


# A stand-in for gcloud on one machine: `ssh` runs --command in bash under the
# fake $HOME (skipping the pip install and the device check), `scp` copies.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
case "$4" in
  ssh) [[ "$cmd" == *"pip install"* || "$cmd" == *"import jax"* ]] && exit 0
       cd "$HOME" && exec bash -c "$cmd" ;;
  scp) cp "$5" "$HOME/${6#*:}" ;;
esac
"""


def fake_tpu(tmp_path, python_body):
  """A fake $HOME with the checkout, a venv whose python runs python_body, and
  gcloud on PATH; returns the environment for the launch scripts."""
  home = tmp_path / "home dir"   # a space: the remote paths are quoted
  (home / "genvis_venv" / "bin").mkdir(parents=True)
  (home / "genvis_jax").symlink_to(LAUNCH.parent)
  py = home / "genvis_venv" / "bin" / "python"
  py.write_text("#!/usr/bin/env bash\n" + python_body)
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir()
  gcloud.write_text(FAKE_GCLOUD)
  for f in (py, gcloud):
    f.chmod(0o755)
  return {"HOME": str(home), "PATH": f"{gcloud.parent}:{ENV['PATH']}",
          "TPU_WORKER_ENDPOINTS": "", "TPU_NAME": "pod", "TPU_ZONE": "z"}


def test_tpu_run_reports_a_failed_start_keeps_its_log_and_refuses_a_second_run(tmp_path):
  """A run that exits at once fails tpu_run.sh with its status and log; a re-run
  appends to the log; a run still going (on any worker) is not started twice;
  --stop waits for it to end; the compile cache is shared (the workdir's)."""
  mode = tmp_path / "mode"
  env = fake_tpu(tmp_path, f'echo "CACHE $JAX_COMPILATION_CACHE_DIR TMP $TMPDIR"\n'
                           f'[[ $(cat {mode}) == fail ]] && {{ echo "Error: boom"; exit 3; }}\n'
                           'exec sleep 60\n')
  # A worker's paths with spaces and ~ reach worker_start.sh as one word
  # each, ~ expanded.
  run = ["--config=configs/rar_b.py", "--workdir=gs://bk/r/", "--start-check=2",
         "--tmpdir=~/big disk", "--venv=~/genvis_venv"]
  log = pathlib.Path(env["HOME"]) / "genvis_logs" / "rar_b.log"
  mode.write_text("fail")
  r = sh("tpu_run.sh", *run, env=env)
  assert r.returncode != 0 and "exited with status 3" in r.stderr, r.stderr
  assert "Error: boom" in r.stderr
  mode.write_text("run")
  r = sh("tpu_run.sh", *run, env=env)
  assert r.returncode == 0, r.stderr
  text = log.read_text()
  assert text.count("==== start") == 2 and "Error: boom" in text
  assert f"CACHE gs://bk/r/jax_cache TMP {env['HOME']}/big disk\n" in text
  pid = int(log.with_suffix(".pid").read_text().split()[0])
  try:
    r = sh("tpu_run.sh", *run, env=env)
    assert r.returncode != 0 and "still running" in r.stderr, r.stderr
    assert log.read_text().count("==== start") == 2
    r = sh("tpu_run.sh", "--run-name=rar_b", "--stop", env=env)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode
  finally:
    subprocess.run(["kill", str(pid)], capture_output=True)


def test_tpu_setup_copy_replaces_the_old_code(tmp_path):
  """The copied checkout is this one's files: a file deleted here (not yet
  committed) neither fails the tarball nor survives from an earlier copy."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  for name in ("common.sh", "tpu_setup.sh"):
    (repo / "launch" / name).write_text((LAUNCH / name).read_text())
  for name in ("a.py", "b.py"):
    (repo / name).write_text(name)
  git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
  subprocess.run(git + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-qm", "x"], check=True)
  (repo / "b.py").unlink()
  (repo / "c.py").write_text("c")
  env = fake_tpu(tmp_path, "")
  # The tarball is staged in a folder of its own, removed after: a fixed
  # name in a shared TMPDIR may be another user's (here one tar cannot
  # write) or a second setup's.
  tmpdir = tmp_path / "tmp"
  (tmpdir / "genvis_jax_src.tar.gz").mkdir(parents=True)
  env["TMPDIR"] = str(tmpdir)
  old = pathlib.Path(env["HOME"]) / "genvis_jax"
  old.unlink()
  old.mkdir()
  (old / "stale.py").write_text("old")
  setup = lambda *a: subprocess.run(
      ["bash", str(repo / "launch" / "tpu_setup.sh"), "--skip-check", *a],
      capture_output=True, text=True, env={**ENV, **env}, timeout=60)
  r = setup("--remote-dir=genvis_jax/")     # a trailing slash: the same folder
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in old.iterdir() if p.is_file()) == ["a.py", "c.py"]
  assert not (pathlib.Path(env["HOME"]) / "genvis_jax.old").exists()
  assert os.listdir(tmpdir) == ["genvis_jax_src.tar.gz"]   # the staging gone
  # A run going from the checkout (its pid file names a live process): the
  # copy would pull its working directory away; nothing is replaced.
  logs = pathlib.Path(env["HOME"]) / "genvis_logs"
  logs.mkdir()
  (logs / "r.pid").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
  (repo / "d.py").write_text("d")
  r = setup()
  assert r.returncode != 0 and "a run is going" in r.stderr, r.stderr
  assert not (old / "d.py").exists()
  # Its pid taken since by another process (another start time): no run.
  (logs / "r.pid").write_text(f"{os.getpid()} 1\n")
  assert setup().returncode == 0 and (old / "d.py").exists()


def test_tpu_setup_from_git_checks_for_a_live_run_and_a_copied_checkout(
    tmp_path):
  """--git-url updated the checkout under a live run (only the copy checked),
  and over a copied (non-git) checkout git refused with its own words."""
  env = fake_tpu(tmp_path, "")
  home = pathlib.Path(env["HOME"])
  (home / "genvis_jax").unlink()
  (home / "genvis_jax").mkdir()   # a copied checkout
  setup = lambda: subprocess.run(
      ["bash", str(LAUNCH / "tpu_setup.sh"), "--skip-check",
       f"--git-url={LAUNCH.parent}"], capture_output=True, text=True,
      env={**ENV, **env}, timeout=60)
  r = setup()
  assert r.returncode != 0 and "holds a copied checkout, not a git one" in (
      r.stderr), r.stderr
  (home / "genvis_logs").mkdir()
  (home / "genvis_logs" / "r.pid").write_text(
      f"{os.getpid()} {_start_time(os.getpid())}\n")
  r = setup()
  assert r.returncode != 0 and "a run is going" in r.stderr, r.stderr


def _start_time(pid: int) -> str:
  """/proc/PID/stat's field 22 (start time), as worker_start.sh reads it."""
  return proc_stat(pid)[19]


def test_a_stale_pid_file_names_no_run_and_stop_kills_nothing(tmp_path):
  """A run's pid file outlives it: once another process has that pid, the
  run was taken as running (a start refused) and --stop killed that
  process."""
  other = subprocess.Popen(["sleep", "30"])
  try:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "r.pid").write_text(f"{other.pid} {int(_start_time(other.pid)) - 1}\n")
    args = ["--run-name=r", f"--log-dir={logs}"]
    r = sh("worker_start.sh", *args, "--check")
    assert r.returncode == 0 and "is not running" in r.stdout, r.stderr
    r = sh("worker_start.sh", *args, "--stop")
    assert r.returncode == 0 and "is not running" in r.stdout, r.stderr
    assert other.poll() is None   # still alive
    # The run's own start time: running.
    (logs / "r.pid").write_text(f"{other.pid} {_start_time(other.pid)}\n")
    r = sh("worker_start.sh", *args, "--check")
    assert r.returncode != 0 and "already running" in r.stderr, r.stderr
  finally:
    other.kill()


def test_workers_with_older_launch_scripts_are_told_to_run_setup(tmp_path):
  """The local tpu_run.sh passes flags a worker's older worker_start.sh does
  not know: the fix is tpu_setup.sh, not "stop the run"."""
  env = fake_tpu(tmp_path, "exec sleep 60\n")
  checkout = pathlib.Path(env["HOME"]) / "genvis_jax"
  checkout.unlink()
  (checkout / "launch").mkdir(parents=True)
  (checkout / "configs").mkdir()
  for name in ("common.sh", "worker_start.sh"):   # an older worker_start.sh
    text = (LAUNCH / name).read_text()
    if name == "worker_start.sh":
      text = text.replace('flag tmpdir GENVIS_TMPDIR', 'flag tmpdir_old GENVIS_TMPDIR')
    (checkout / "launch" / name).write_text(text)
  r = sh("tpu_run.sh", "--config=configs/rar_b.py", "--workdir=gs://bk/r", env=env)
  assert r.returncode != 0
  assert "older than this one: run launch/tpu_setup.sh first" in r.stderr, r.stderr


def test_copy_ckpt_takes_the_newest_finished_step(tmp_path):
  """A save cut short (a reclaimed VM) leaves a step folder without Orbax's
  commit file; the newest step copied alone would be one nothing can read."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      "case \"$2\" in\n"
      "  ls) printf 'gs://bk/r/checkpoints/1000/commit_success.txt\\n"
      "gs://bk/r/checkpoints/9000/commit_success.txt\\n' ;;\n"
      "  cp) echo \"COPY $4 $5\" ;;\n"
      "esac\n")
  (bin_dir / "gcloud").chmod(0o755)
  r = sh("tpu_copy_ckpt.sh", "--workdir=gs://bk/r", f"--dest={tmp_path}/d",
         env={"PATH": f"{bin_dir}:{ENV['PATH']}"})
  assert r.returncode == 0, r.stderr
  assert f"COPY gs://bk/r/checkpoints/9000 {tmp_path}/d/checkpoints/" in r.stdout
