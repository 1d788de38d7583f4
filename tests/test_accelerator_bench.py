"""bench/accelerator.py: the smoke run of every section, as the GPU machine sees
the repository (tensorflow / clu / grain / array_record unimportable,
ml_collections only from a carried wheel), plus its pure helpers."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from bench import accel_attention
from bench import accel_harness as harness
from bench import accel_train
from bench import accelerator as acc
from genvis_jax.sample import ar
from tests import CPU_COMPILE_FLAGS
from tests.test_imports_no_tf import BLOCKER

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = [s[0] for s in acc.SECTIONS]

# ml_collections may only come from a *.whl on sys.path (as on the GPU
# machine, where it is not installed).
WHEEL_ONLY = textwrap.dedent("""
    import importlib.machinery
    class _WheelOnly(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name != "ml_collections":
          return None
        wheels = [p for p in sys.path if p.endswith(".whl")]
        spec = importlib.machinery.PathFinder.find_spec(name, wheels)
        if spec is None:
          raise ImportError("ml_collections is not installed here")
        return spec
    sys.meta_path.insert(0, _WheelOnly())
""")


def _make_wheel(directory: pathlib.Path) -> pathlib.Path:
  """A zip of the installed ml_collections package (what `pip download`
  gives: a pure-Python wheel importable from sys.path)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  pkg = pathlib.Path(ml_collections.__file__).parent
  whl = directory / "ml_collections-0-py3-none-any.whl"
  with zipfile.ZipFile(whl, "w") as z:
    for f in pkg.rglob("*.py"):
      z.write(f, f.relative_to(pkg.parent))
  return whl


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("acc")
  wheels = tmp / "wheels"
  wheels.mkdir()
  _make_wheel(wheels)
  out = tmp / "out"
  code = BLOCKER + WHEEL_ONLY + textwrap.dedent(f"""
      import runpy
      sys.argv = ["accelerator.py", "--smoke", "--out={out}",
                  "--wheels={wheels}"]
      try:
        runpy.run_path({str(ROOT / 'bench' / 'accelerator.py')!r},
                       run_name="__main__")
        rc = 0
      except SystemExit as e:
        rc = e.code
      leaked = sorted(k for k in sys.modules if k.split(".")[0] in _BLOCKED)
      print("LEAKED", leaked)
      sys.exit(rc or (1 if leaked else 0))
  """)
  # One CPU device, as the GPU machine has one chip.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="",
             XLA_FLAGS=CPU_COMPILE_FLAGS)
  # Run from outside the repository: the script must find its own root.
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env,
                        capture_output=True, text=True, timeout=600)
  return proc, out


@pytest.mark.slow
def test_smoke_every_section_ok(smoke):
  proc, out = smoke
  log = proc.stdout[-4000:] + proc.stderr[-4000:]
  assert proc.returncode == 0, log
  assert "LEAKED []" in proc.stdout, log
  data = json.loads((out / "results.json").read_text())
  status = {k: v["status"] for k, v in data["sections"].items()}
  assert status == {name: "ok" for name in SECTIONS}, (status, log)
  for name in SECTIONS:
    assert data["sections"][name]["rows"], name
  assert data["header"]["ml_collections"].endswith(".whl")
  for key in ("device", "jax", "jaxlib", "flax", "commit"):
    assert data["header"][key], key
  md = (out / "results.md").read_text()
  for name in SECTIONS:
    assert f"### {name}: ok" in md


@pytest.mark.slow
def test_smoke_numbers(smoke):
  _, out = smoke
  sec = json.loads((out / "results.json").read_text())["sections"]
  # The interpreted GPU kernel matches the XLA reference, forward and backward.
  check = {r["output"]: r for r in sec["attention_check"]["rows"]}
  assert set(check) == {"out", "dq", "dk", "dv"}
  assert all(r["ok"] and r["rel_err"] < 1e-4 for r in check.values()), check
  timed = sec["attention"]["rows"]
  assert {r["impl"] for r in timed} == {"dense", "reference", "pallas_gpu"}
  assert any("skipped" in (r.get("note") or "") for r in timed)  # dense, big N
  for name, key in (("rar_sampling", "images_per_s_decoded"),
                    ("rar_train", "tokens_per_s"),
                    ("far_sampling", "images_per_s"),
                    ("eq_sampling", "columns_per_s"),
                    ("inception", "images_per_s")):
    assert all(r[key] > 0 for r in sec[name]["rows"]), name
  for name in ("rar_sampling", "far_sampling"):   # the sample dtype switch
    rows = sec[name]["rows"]
    assert {r["dtype"] for r in rows} == set(harness.SMOKE.sample_dtypes), name
    assert all(r["weight_gb_per_s"] > 0 and r["x_floor"] > 0
               and r["bytes_ratio"] > 0 for r in rows), name
  # The RAR decoder's default KV chunking and one body over the whole cache,
  # under one floor per dtype.
  rar = sec["rar_sampling"]["rows"]
  assert {r["bucket"] for r in rar} == {ar.DEFAULT_BUCKET, 0}
  for dtype in harness.SMOKE.sample_dtypes:
    assert len({r["floor_s"] for r in rar if r["dtype"] == dtype}) == 1
  train = sec["rar_train"]["rows"][0]
  assert np.isfinite(train["loss"]) and train["peak_gib_compiled"] > 0


def test_band_pairs_counts_the_mask():
  from genvis_jax.kernels.windowed_attention import window_mask
  for n, w in ((1, 1), (7, 3), (64, 16), (100, 200)):
    assert accel_attention.band_pairs(n, w) == int(window_mask(n, window=w).sum())


def test_fit_batch_is_largest_power_of_two_under_the_limit():
  cap, b0, b1 = 100 * 2**30, 32, 128
  intercept, slope = 20 * 2**30, 0.11 * 2**30      # bytes, bytes per example
  got = accel_train._fit_batch(cap, b0, intercept + slope * b0, b1,
                       intercept + slope * b1, 4096)
  fits = [2**i for i in range(13) if intercept + slope * 2**i <= 0.92 * cap]
  assert got == max(fits)
  assert accel_train._fit_batch(cap, b0, intercept + slope * b0, b1,
                        intercept + slope * b1, 256) == 256


def test_peak_table():
  """The suite's MFU reads the training log's table (tests/test_metrics.py)."""
  assert harness.peak_flops("NVIDIA H200") == 989e12
  assert harness.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert harness.peak_flops("cpu") is None


def test_deadline_require():
  dl = harness.Deadline(time.perf_counter() + 100)
  dl.require(10, "a short step")
  with pytest.raises(harness.SectionTimeout, match="a long step skipped"):
    dl.require(1000, "a long step")


def test_failing_and_slow_sections_do_not_stop_the_run(tmp_path, monkeypatch):
  def boom(sec, dl, sz, smoke):
    raise RuntimeError("no such kernel")

  def slow(sec, dl, sz, smoke):
    sec.add(x=1)
    dl.end = 0.0   # the time box ends between two measurements
    dl.check("the second one")
    sec.add(x=2)

  def fine(sec, dl, sz, smoke):
    sec.add(y=3)
  monkeypatch.setattr(acc, "SECTIONS", (("a", boom, 1, ()), ("b", slow, 1, ()),
                                        ("c", fine, 1, ("y",))))
  assert acc.main([f"--out={tmp_path}", "--smoke"]) == 1
  sec = json.loads((tmp_path / "results.json").read_text())["sections"]
  assert sec["a"]["status"] == "failed"
  assert "RuntimeError: no such kernel" in sec["a"]["notes"][-1]
  assert sec["b"]["status"] == "timeout" and sec["b"]["rows"] == [{"x": 1}]
  assert sec["c"]["status"] == "ok" and sec["c"]["rows"] == [{"y": 3}]


def test_rows_are_on_file_as_measured_and_a_kill_is_recorded(tmp_path,
                                                             monkeypatch):
  """The files were written between sections only: a run killed by the
  command limit inside a section (RAR sampling's box is longer than one
  command) lost every row of it. Rows are written as they are measured
  (and again as later columns complete them); SIGTERM marks the section."""
  import signal
  on_file = lambda: json.loads((tmp_path / "results.json").read_text())[
      "sections"]["a"]

  def killed_inside(sec, dl, sz, smoke):
    row = sec.keep({"x": 1})
    assert on_file()["rows"] == [{"x": 1}] and on_file()["status"] == "running"
    row["floor"] = 2.0
    sec.show(row)
    assert on_file()["rows"] == [{"x": 1, "floor": 2.0}]
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)

  monkeypatch.setattr(acc, "SECTIONS", (("a", killed_inside, 100, ("x",)),
                                        ("b", killed_inside, 100, ("x",))))
  before = signal.getsignal(signal.SIGTERM)
  # The handler ends the process with os._exit (an exit under XLA's threads
  # crashed): raised here instead, to see the code.
  monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(
      SystemExit(code)))
  with pytest.raises(SystemExit) as stop:
    acc.main([f"--out={tmp_path}", "--smoke"])
  assert stop.value.code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  sec = json.loads((tmp_path / "results.json").read_text())["sections"]
  assert sec["a"] == {"status": "killed (SIGTERM)", "seconds": 0.0,
                      "rows": [{"x": 1, "floor": 2.0}], "notes": []}
  assert sec["b"]["status"] == "pending"
  assert "### a: killed (SIGTERM)" in (tmp_path / "results.md").read_text()


def test_the_readme_budget_for_everything_is_the_boxes_sum():
  """The README's whole-suite command gave the last section 10 s less than
  its box."""
  import re
  readme = (ROOT / "README.md").read_text()
  budget = int(re.search(r"--budget_s=(\d+) +# everything", readme)[1])
  assert budget == sum(box for _, _, box, _ in acc.SECTIONS)


def test_missing_ml_collections_says_how_to_carry_it(tmp_path, monkeypatch):
  from genvis_jax.errors import UserError
  monkeypatch.setitem(sys.modules, "ml_collections", None)  # import fails
  with pytest.raises(UserError, match="pip download ml_collections --no-deps "
                     "-d wheels/") as err:
    harness.ensure_ml_collections([str(tmp_path)])
  assert isinstance(err.value, ImportError)


@pytest.mark.parametrize("fails_above, want", [(None, [64, 128]), (16, [16])])
def test_train_batch_search(monkeypatch, fails_above, want):
  """The real-run path (device memory known), on a linear memory model with a
  batch-independent part the one-point probe wrongly counts per example."""
  gb = 2**30
  fixed, temp0, per = 12 * gb, 30 * gb, 0.3 * gb
  peak = lambda b: fixed + temp0 + per * b

  def measure(remat, batch, *a):
    if peak(batch) > 100 * gb or (fails_above and batch > fails_above):
      raise MemoryError("RESOURCE_EXHAUSTED")
    return dict(remat=remat, batch=batch, tokens_per_s=float(batch),
                _peak=peak(batch))
  train = accel_train
  monkeypatch.setattr(train, "CAPACITY_OVERRIDE", 100 * gb)
  monkeypatch.setattr(train, "_rar_trainer",
                      lambda remat, batch, *a: (None, batch))
  monkeypatch.setattr(train, "_compile_step", lambda cfg, b: (0.0, b, None))
  monkeypatch.setattr(train, "memory_bytes", lambda b: dict(
      argument=fixed, generated_code=0, peak=peak(b)))
  monkeypatch.setattr(train, "_measure_step", measure)
  sec = harness.Section("rar_train", ())
  sizes = dataclasses.replace(harness.REAL, train_remats=("none",))
  train.section_rar_train(sec, harness.Deadline(float("inf")), sizes, False)
  assert [r["batch"] for r in sec.rows] == want
  # Largest power of two within 92% of memory (42 GiB + 0.3 GiB x b).
  if fails_above is None:
    assert max(2**i for i in range(11) if peak(2**i) <= 92 * gb) == want[-1]


def test_a_run_keeps_earlier_results_and_refuses_what_measures_nothing(
    tmp_path, capsys):
  """An --out holding results.json was overwritten in 2 s; the full sizes
  on a CPU backend ran paper-size models for minutes; a budget of 0 marked
  every section "timeout" with "rows above were measured" (none were)."""
  from genvis_jax.errors import UserError
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(SystemExit):
    acc.parse_args([f"--out={tmp_path}"])
  assert "holds an earlier run's rows" in capsys.readouterr().err
  assert acc.parse_args([f"--out={tmp_path}", "--force"]).force
  with pytest.raises(SystemExit):
    acc.parse_args([f"--out={tmp_path / 'new'}", "--budget_s=0"])
  with pytest.raises(UserError, match="the backend is CPU"):
    acc.main([f"--out={tmp_path / 'cpu'}", "--sections=rar_sampling"])


def test_size_overrides_are_literals_of_known_fields():
  args = acc.parse_args(["--out=x", "--size", "rar_sizes=('b',)",
                         "--size", "rar_decode=False", "--size", "iters=2"])
  assert args.size == {"rar_sizes": ("b",), "rar_decode": False, "iters": 2}
  assert dataclasses.replace(harness.REAL, **args.size).rar_sizes == ("b",)
  for bad, says in (("rar_size=('b',)", "FIELD one of"),   # a typo
                    ("iters", "FIELD=VALUE"),
                    ("rar_batches=(64", "not a Python literal"),
                    ("rar_sizes=(b,)", "strings need Python quotes"),
                    ("rar_batches=64", r"takes a tuple, e.g. rar_batches=\(64"),
                    ("rar_decode=1", "takes True or False"),
                    ("iters=True", "takes an int"),
                    ("iters=0", "at least 1"),
                    ("rar_sizes=()", "non-empty")):
    with pytest.raises(SystemExit):
      acc.parse_args(["--out=x", "--size", bad])
    with pytest.raises(ValueError, match=says):
      acc._size_override(bad)


def test_host_random_params_follow_the_fan_in():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((512, 64), jnp.float32),
                        "bias": jax.ShapeDtypeStruct((64,), jnp.float32)},
              "norm": {"scale": jax.ShapeDtypeStruct((64,), jnp.bfloat16)},
              "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 4),
                                                      jnp.bfloat16)}}
  p = harness.host_random_params(abstract)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), p) == jax.tree.map(
      lambda a: (a.shape, np.dtype(a.dtype)), abstract)
  k = p["dense"]["kernel"]
  assert abs(k.std() * np.sqrt(512) - 1) < 0.05 and np.isfinite(k).all()
  conv = p["conv"]["kernel"].astype(np.float32)
  assert abs(conv.std() * np.sqrt(72) - 1) < 0.3
  assert (p["dense"]["bias"] == 0).all() and (p["norm"]["scale"] == 1).all()


def test_boxes_are_seconds_capped_by_the_budget(tmp_path, monkeypatch):
  """A budget below the boxes' sum keeps the first sections' boxes whole and
  ends the last ones at the budget (time the first leave unused flows on); a
  larger budget stretches every box."""
  ends = {}

  def record(name):
    def fn(sec, dl, sz, smoke):
      ends[name] = dl.end
      sec.add(x=1)
    return fn
  monkeypatch.setattr(acc, "SECTIONS", tuple(
      (n, record(n), 100, ("x",)) for n in ("a", "b", "c")))
  for budget, want in ((150, (100, 150, 150)), (600, (200, 400, 600))):
    t0 = time.perf_counter()
    assert acc.main([f"--out={tmp_path}", "--smoke", "--force",
                     f"--budget_s={budget}"]) == 0
    got = [ends[n] - t0 for n in "abc"]
    assert all(w <= g < w + 5 for g, w in zip(got, want)), (budget, got)


def test_sampling_benches_time_warm_runs_only():
  """Each compiled mode runs once untimed first: the timed first run carried
  one-off costs (1.35x the floor at one repeat where warm runs were 0.92x)."""
  from bench import sampling_floor as b
  calls = {"floor": 0, "cached": 0}
  def run(mode):
    def f():
      calls[mode] += 1
      return calls[mode]
    return f
  times, outs = b.time_interleaved({m: run(m) for m in calls}, repeats=2)
  assert calls == {"floor": 3, "cached": 3}
  assert {m: len(t) for m, t in times.items()} == {"floor": 2, "cached": 2}
  assert outs == {"floor": 3, "cached": 3}


def test_sampling_bench_flags_are_checked_before_a_model_is_built():
  """An unknown mode failed after the model was built and the first mode
  compiled (minutes at paper size); --repeats=0 in statistics.median."""
  import argparse
  from bench import bench_rar_sampling as rar
  from bench import sampling_floor as b
  p = argparse.ArgumentParser()
  for flag, default in (("--modes", "floor"), ("--batch", 1), ("--repeats", 1)):
    p.add_argument(flag, type=type(default), default=default)
  b.check_args(p, p.parse_args(["--modes=floor,cached,cached_b32"]), rar.MODES)
  for argv in (["--modes=floor,bogus"], ["--modes=cached_bx"], ["--modes=cached_bN"],
               ["--repeats=0"],
               ["--batch=0"]):
    with pytest.raises(SystemExit):
      b.check_args(p, p.parse_args(argv), rar.MODES)


def test_input_bench_times_a_configs_image_pipeline(capsys):
  """bench/bench_input.py runs a config's own training pipeline over
  synthetic JPEGs and prints images/s per worker count; a config training
  on token files is refused by name."""
  from bench import bench_input
  bench_input.main(["--config=configs/eq_tokenizer.py:runlocal", "--batch=4",
                    "--batches=1", "--images=8", "--image_shape=48x40",
                    "--workers=0"])
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("# configs/eq_tokenizer.py:runlocal: 32 px, crops "
                           "albumentations, 8 JPEGs of 48x40")
  assert re.fullmatch(r"\| 0 \| [\d.]+ \| \d+ \| \d+ \|", out[-1]), out
  with pytest.raises(SystemExit):
    bench_input.main(["--config=configs/rar_b.py:runlocal"])
  assert "trains on token files" in capsys.readouterr().err


def test_input_bench_times_after_every_worker_started(monkeypatch):
  """Grain starts its workers one at a time, as each is first asked for a
  batch: the second of 2 workers' start (1.5 s here) landed in the timed
  batches and made 2 workers read 3x slower than 1."""
  import ml_collections
  from bench import bench_input
  from genvis_jax import data as data_lib
  calls = []

  def fake_dataset(*_, **__):
    def batches():
      while True:
        calls.append(1)
        if len(calls) == 2:
          time.sleep(1.0)      # the second worker starting
        yield {}
    return batches(), None
  monkeypatch.setattr(data_lib, "create_dataset", fake_dataset)
  config = ml_collections.ConfigDict(dict(num_workers=2))
  start, each = bench_input.time_pipeline(config, 4, 3, (0.0, 1.0))
  assert start >= 1.0 and each < 0.1, (start, each)


def test_the_rar_floor_reads_every_modulation_weight():
  """The floor with adaLN multiplies every adaLN modulation kernel a step
  without tables reads, the blocks' and the head's: it left the head's out,
  so such a step read more weights than the floor it is held to."""
  import jax   # pylint: disable=import-outside-toplevel
  from bench import bench_rar_sampling as rar_bench   # pylint: disable=import-outside-toplevel
  from genvis_jax import models   # pylint: disable=import-outside-toplevel
  cfg = rar_bench.model_config("small", 16)
  model = models.build(cfg)
  params = jax.eval_shape(lambda k: models.init_params(cfg, k),
                          jax.random.key(0))
  modulation = {jax.tree_util.keystr(path) for path, _ in
                jax.tree_util.tree_leaves_with_path(params)
                if "adaLN_modulation" in jax.tree_util.keystr(path)
                and "kernel" in jax.tree_util.keystr(path)}
  added = (set(rar_bench.floor_paths(model, True))
           - set(rar_bench.floor_paths(model, False)))
  assert {"".join(f"['{p}']" for p in path) for path in added} == modulation
