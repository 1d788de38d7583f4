"""Checkpoint conversion: parity with the official PyTorch code (golden fixtures),
official key layouts, mismatch reports and the CLI (reading the files without
torch: ``test_convert_io.py``).

Fixtures (see tests/fixtures/README.md) hold random official weights of reduced
configs, inputs and the official outputs; no torch is needed here.
"""

import importlib
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import maskgit_vqgan as maskgit_config
from configs import rar_b
from genvis_jax import convert, models
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from genvis_jax.core import weights
from genvis_jax.core.weights import restore_params

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _rel(got, want):
  """max |got - want| / max |want| in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _fixture(name):
  with np.load(os.path.join(FIX, name)) as f:
    data = {k: f[k] for k in f.files}
  state = {k[len("param/"):]: v.astype(np.float32)
           for k, v in data.items() if k.startswith("param/")}
  return data, state


def _rar_config(data):
  h, depth, heads, mlp, v, c, n = (int(x) for x in data["config"])
  cfg = rar_b.get_config().model
  cfg.update(dict(hidden_size=h, depth=depth, num_heads=heads, mlp_dim=mlp,
                  codebook_size=v, num_classes=c, seq_len=n, max_pos=n + 1024,
                  num_timesteps=n + 100, dtype="float32"))
  return cfg


def _device(params):
  return jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def rar():
  data, state = _fixture("rar_parity.npz")
  cfg = _rar_config(data)
  params = _device(convert.from_torch("rar", state, cfg))
  return data, state, cfg, models.build(cfg), params


# --- RAR parity ---------------------------------------------------------------

def test_rar_forward_matches_official_random_orders_and_raster(rar):
  data, _, _, model, params = rar
  tokens, labels, orders = (jnp.asarray(data[k]) for k in ("tokens", "labels", "orders"))
  assert not (data["orders"][:2] == np.arange(tokens.shape[1])).all()  # permuted rows
  fwd = jax.jit(lambda p, o: model.apply({"params": p}, tokens, labels, o))
  permuted = fwd(params, orders)
  raster = jax.jit(lambda p: model.apply({"params": p}, tokens, labels))(params)
  assert permuted.shape == data["logits_orders"].shape == (3, 17, 16)
  assert _rel(permuted, data["logits_orders"]) <= TOL
  assert _rel(raster, data["logits_raster"]) <= TOL
  # The random-order logits really differ from raster (the test can fail).
  assert _rel(data["logits_orders"][:2], data["logits_raster"][:2]) > 1e-2


def test_rar_kv_cache_decoding_matches_official_forward(rar):
  data, _, _, model, params = rar
  tokens, labels = jnp.asarray(data["tokens"]), jnp.asarray(data["labels"])
  prefill = jax.jit(lambda p, y: model.apply({"params": p}, y, method="prefill",
                                             mutable=["cache"]))
  step = jax.jit(lambda p, c, t, y, i: model.apply(
      {"params": p, "cache": c}, t, y, i, method="decode_step", mutable=["cache"]))
  logits, state = prefill(params, labels)
  out = [logits]
  for i in range(tokens.shape[1]):
    logits, state = step(params, state["cache"], tokens[:, i], labels, i)
    out.append(logits)
  assert _rel(jnp.stack(out, axis=1), data["logits_raster"]) <= TOL


def _rar_b_official_shapes():
  """RAR-B keys and torch shapes as listed in specs/rar.md (Linear: (out, in))."""
  d, mlp, depth = 768, 3072, 24
  s = {"cls_token": (1, 1, d), "pos_embed": (1, 1280, d),
       "target_aware_pos_embed": (1, 1280, d), "timesteps_embeddings": (1, 356, d),
       "embeddings.weight": (2026, d),
       "adaln_before_head.adaLN_modulation.1.weight": (2 * d, d),
       "adaln_before_head.adaLN_modulation.1.bias": (2 * d,),
       "lm_head.weight": (1024, d), "lm_head.bias": (1024,)}
  for i in range(depth):
    b = f"blocks.{i}."
    for name, (out, inp) in {"attn.qkv": (3 * d, d), "attn.proj": (d, d),
                             "mlp.fc1": (mlp, d), "mlp.fc2": (d, mlp),
                             "adaLN_modulation.1": (6 * d, d)}.items():
      s[b + name + ".weight"], s[b + name + ".bias"] = (out, inp), (out,)
    for name, width in {"norm1": d, "norm2": d, "attn.q_norm": 48,
                        "attn.k_norm": 48}.items():
      s[b + name + ".weight"] = s[b + name + ".bias"] = (width,)
  return s


def test_rar_b_official_key_layout_matches_config_exactly():
  shapes = _rar_b_official_shapes()
  assert len(shapes) == 24 * 18 + 9
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, v) for k, v in shapes.items()}  # no memory
  cfg = rar_b.get_config().model
  params = convert.from_torch("rar", state, cfg)  # raises on any mismatch
  want = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(want))
  assert params["blocks_23"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  assert params["blocks_0"]["attn"]["q_norm"]["scale"].shape == (48,)
  assert abs(models.count_params(params) / 1e6 - 260.9) < 0.05  # spec's count


def test_rar_linear_weights_are_transposed_not_reshaped(rar):
  _, state, _, _, params = rar
  w = state["blocks.1.attn.qkv.weight"]
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], w.T)
  np.testing.assert_array_equal(params["adaln_before_head"]["adaLN_modulation"]["kernel"],
                                state["adaln_before_head.adaLN_modulation.1.weight"].T)
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["k_norm"]["scale"],
                                state["blocks.0.attn.k_norm.weight"])


# --- MaskGIT VQGAN parity -----------------------------------------------------

def test_maskgit_vqgan_matches_official_codes_and_reconstructions():
  data, state = _fixture("maskgit_vqgan_parity.npz")
  hid, nrb, z, k, res, *mult = (int(v) for v in data["config"])
  cfg = maskgit_config.get_config().model.unlock()   # class-default fields too
  cfg.update(dict(hidden_channels=hid, channel_mult=tuple(mult), num_res_blocks=nrb,
                  z_channels=z, code_dim=z, num_codes=k, image_size=res))
  model = models.build(cfg)
  params = _device(convert.from_torch("maskgit_vqgan", state, cfg))
  images = jnp.asarray(data["images"])
  codes = jax.jit(lambda p: model.apply({"params": p}, images, method="encode"))(params)
  recon, _ = jax.jit(lambda p: model.apply({"params": p}, images))(params)
  decoded = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode"))(
      params, jnp.asarray(data["codes"]))
  np.testing.assert_array_equal(np.asarray(codes), data["codes"])
  assert len(np.unique(data["codes"])) > 8  # a real test of the code search
  assert _rel(recon, data["recon"]) <= TOL
  assert _rel(decoded, data["decoded"]) <= TOL
  # Keys of other modules or kinds keep their names: one report lists all.
  bad = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
  bad["discriminator.conv.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  bad["encoder.norm_out.running_mean"] = np.zeros(hid, np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): decoder/"
                     r"conv_out/bias(.|\n)*unexpected \(2\): discriminator."
                     r"conv.weight, encoder.norm_out.running_mean"):
    convert.from_torch("maskgit_vqgan", bad, cfg)


# --- LlamaGen VQ parity ---------------------------------------------------------

def _llamagen_config(data):
  ch, nrb, z, k, d, res, *mult = (int(v) for v in data["config"])
  return ml_collections.ConfigDict(dict(
      name="llamagen_vq", hidden_channels=ch, channel_mult=tuple(mult),
      num_res_blocks=nrb, z_channels=z, num_codes=k, code_dim=d, image_size=res))


def test_llamagen_vq_matches_official_codes_and_reconstructions():
  data, state = _fixture("llamagen_vq_parity.npz")
  assert "quantize.codebook_used" in state  # official buffer, dropped
  cfg = _llamagen_config(data)
  model = models.build(cfg)
  params = _device(convert.from_torch("llamagen_vq", state, cfg))
  images = jnp.asarray(data["images"])
  codes = jax.jit(lambda p: model.apply({"params": p}, images, method="encode"))(params)
  recon, _ = jax.jit(lambda p: model.apply({"params": p}, images))(params)
  decoded = jax.jit(lambda p, c: model.apply({"params": p}, c, method="decode"))(
      params, jnp.asarray(data["codes"]))
  np.testing.assert_array_equal(np.asarray(codes), data["codes"])
  assert len(np.unique(data["codes"])) > 8
  assert _rel(recon, data["recon"]) <= TOL
  assert _rel(decoded, np.clip(data["decoded"], -1.0, 1.0)) <= TOL  # ours clips


def _llamagen_official_shapes(ch=128, mult=(1, 1, 2, 2, 4), nrb=2, z=256,
                              k=16384, d=8):
  """Official VQModel keys/shapes (vq_model.py: Encoder, Decoder with nrb + 1
  res blocks per level, attention at the lowest resolution, mid res-attn-res)."""
  s = {}

  def conv(name, o, i, ks):
    s[name + ".weight"], s[name + ".bias"] = (o, i, ks, ks), (o,)

  def norm(name, c):
    s[name + ".weight"] = s[name + ".bias"] = (c,)

  def res(p, cin, cout):
    norm(p + ".norm1", cin), conv(p + ".conv1", cout, cin, 3)
    norm(p + ".norm2", cout), conv(p + ".conv2", cout, cout, 3)
    if cin != cout:
      conv(p + ".nin_shortcut", cout, cin, 1)

  def attn(p, c):
    norm(p + ".norm", c)
    for n in ("q", "k", "v", "proj_out"):
      conv(f"{p}.{n}", c, c, 1)

  def mid(p, c):
    res(p + ".mid.0", c, c), attn(p + ".mid.1", c), res(p + ".mid.2", c, c)

  n, c = len(mult), ch
  conv("encoder.conv_in", ch, 3, 3)
  for i, m in enumerate(mult):
    for j in range(nrb):
      res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
      c = ch * m
      if i == n - 1:
        attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
    if i != n - 1:
      conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
  mid("encoder", c), norm("encoder.norm_out", c), conv("encoder.conv_out", z, c, 3)
  conv("decoder.conv_in", c, z, 3), mid("decoder", c)
  for idx, level in enumerate(reversed(range(n))):
    for j in range(nrb + 1):
      res(f"decoder.conv_blocks.{idx}.res.{j}", c, ch * mult[level])
      c = ch * mult[level]
      if level == n - 1:
        attn(f"decoder.conv_blocks.{idx}.attn.{j}", c)
    if level != 0:
      conv(f"decoder.conv_blocks.{idx}.upsample.conv", c, c, 3)
  norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
  conv("quant_conv", d, z, 1), conv("post_quant_conv", z, d, 1)
  s["quantize.embedding.weight"], s["quantize.codebook_used"] = (k, d), (65536,)
  return s


@pytest.mark.parametrize("config_name,mult,num_keys",
                         [("vq_ds16", (1, 1, 2, 2, 4), 344),
                          ("vq_ds8", (1, 2, 2, 4), 300)])
def test_llamagen_vq_official_layouts_match_configs(config_name, mult, num_keys):
  shapes = _llamagen_official_shapes(mult=mult)
  assert len(shapes) == num_keys  # counted on the official VQ_16 / VQ_8
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, v) for k, v in shapes.items()}
  cfg = importlib.import_module(f"configs.{config_name}").get_config().model
  params = convert.from_torch("llamagen_vq", state, cfg)
  i = next(i for i in range(1, len(mult)) if mult[i] != mult[i - 1])
  kernel = params["encoder"][f"conv_blocks_{i}"]["res_0"]["shortcut"]["kernel"]
  assert kernel.shape == (1, 1, 128 * mult[i - 1], 128 * mult[i])  # HWIO


# --- mismatch reports, convert_file and the CLI ---------------------------------

def _write_npz(path, state):
  np.savez(path, **state)
  return str(path)


def test_mismatching_checkpoint_lists_keys_and_writes_nothing(rar, tmp_path):
  data, state, cfg, _, _ = rar
  bad = dict(state)
  del bad["lm_head.bias"]
  bad["blocks.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  bad["cls_token"] = np.zeros((1, 1, 8), np.float32)
  src = _write_npz(tmp_path / "bad.npz", bad)
  dst = tmp_path / "out"
  with pytest.raises(CheckpointMismatchError) as err:
    convert.convert_file("rar", src, cfg, str(dst))
  msg = str(err.value)
  assert "missing (1): lm_head/bias" in msg
  assert "unexpected (1): blocks.0.attn.extra.weight" in msg
  assert "mis-shaped (1): cls_token expected (1, 1, 32) found (1, 1, 8)" in msg
  assert not dst.exists()
  # A config of another size: mis-shaped keys, also nothing written.
  other = _rar_config(data)
  other.mlp_dim = 96
  with pytest.raises(CheckpointMismatchError, match=r"mis-shaped \(6\)"):
    convert.convert_file("rar", _write_npz(tmp_path / "ok.npz", state), other, str(dst))
  assert not dst.exists()


def test_convert_file_writes_what_init_from_loads(rar, tmp_path):
  """The weights load back equal; the convert config recorded beside them
  names the model settings a mismatching config differs in, and an
  overwrite without a config drops the old record."""
  data, state, cfg, _, params = rar
  src = _write_npz(tmp_path / "rar.npz", state)
  dst = str(tmp_path / "ckpt")
  config = ml_collections.ConfigDict({"model": cfg})
  convert.convert_file("rar", src, cfg, dst, config=config)
  abstract = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
  loaded = restore_params(dst, abstract, model_config=cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  assert weights.recorded_config(dst) == (
      json.loads(config.to_json_best_effort()), "converted")
  # Which official file they are: path, bytes and SHA-256 of what was read.
  with open(os.path.join(dst, "converted_from.json")) as f:
    read = json.load(f)
  assert read == {"key": None, "files": [{
      "path": src, "bytes": os.path.getsize(src),
      "sha256": hashlib.sha256(open(src, "rb").read()).hexdigest()}]}
  other = _rar_config(data)
  other.mlp_dim = 96
  wrong = jax.eval_shape(lambda r: models.init_params(other, r), jax.random.key(0))
  with pytest.raises(CheckpointMismatchError,
                     match=r"converted for other model settings:\n +"
                           r"model.mlp_dim: weights \d+ vs config 96"):
    restore_params(dst, wrong, model_config=other)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.convert_file("rar", src, cfg, dst)
  convert.convert_file("rar", src, cfg, dst, overwrite=True)
  assert weights.recorded_config(dst) == (None, "")


def test_unknown_kind_and_missing_config_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown --kind='nope'.*rar"):
    convert.from_torch("nope", {}, None)
  with pytest.raises(ValueError, match="needs the model config"):
    convert.from_torch("rar", {}, None)


def test_cli_converts_with_config_overrides(rar, tmp_path):
  data, state, _, _, _ = rar
  h, depth, heads, mlp, v, c, n = (int(x) for x in data["config"])
  src = _write_npz(tmp_path / "rar.npz", state)
  dst = tmp_path / "cli"
  m = "--config.model."
  cmd = [sys.executable, "-m", "genvis_jax.convert", "--kind=rar", f"--src={src}",
         f"--dst={dst}", f"--config={REPO}/configs/rar_b.py", f"{m}hidden_size={h}",
         f"{m}depth={depth}", f"{m}num_heads={heads}", f"{m}mlp_dim={mlp}",
         f"{m}codebook_size={v}", f"{m}num_classes={c}", f"{m}seq_len={n}",
         f"{m}max_pos={n + 1024}", f"{m}num_timesteps={n + 100}"]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "parameters" in run.stdout and (dst / "params").is_dir()
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and "--overwrite" in again.stderr
  # A demo config (stages, no config.model): one message, not a traceback.
  demo = [a if not a.startswith("--config") else f"--config={REPO}/configs/demo.py"
          for a in cmd if not a.startswith("--config.")]
  out = subprocess.run(demo + ["--overwrite"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "Error: --config has no config.model (a demo config runs stages" in out.stderr


# --- LPIPS (torchvision vgg16 + LPIPS lin weights -> .npz) ---------------------

def test_lpips_kind_merges_two_files_into_loadable_npz(tmp_path):
  from genvis_jax.convert import lpips as convert_lpips
  from genvis_jax.models import lpips
  rng = np.random.default_rng(0)
  vgg, lin = {}, {}
  c_in = 3
  for s, idxs in enumerate(lpips.VGG_SLICES):
    for idx in idxs:
      c = lpips.VGG_WIDTHS[s]
      vgg[f"features.{idx}.weight"] = np.full((c, c_in, 3, 3), idx, np.float32)
      vgg[f"features.{idx}.bias"] = rng.normal(size=c).astype(np.float32)
      c_in = c
    lin[f"lin{s}.model.1.weight"] = rng.random((1, lpips.VGG_WIDTHS[s], 1, 1),
                                               np.float32)
  vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # ignored
  a = tmp_path / "vgg16.npz"
  np.savez_compressed(a, **vgg)
  b = _write_npz(tmp_path / "lin.npz", lin)
  dst = str(tmp_path / "vgg_lpips.npz")
  convert.convert_file("lpips", f"{a},{b}", None, dst)
  params = convert_lpips.load_lpips_params(dst)
  np.testing.assert_array_equal(params["lin_3"]["kernel"][0, 0, :, 0],
                                lin["lin3.model.1.weight"][0, :, 0, 0])
  assert float(params["features_28"]["kernel"][0, 0, 0, 0]) == 28.0
  assert "classifier.0.weight" not in np.load(dst).files
  with pytest.raises(ValueError, match="missing"):
    convert.convert_file("lpips", str(a), None, str(tmp_path / "x.npz"))
