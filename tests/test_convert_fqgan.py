"""``fqgan`` conversion: parity with the official FQGAN Dual / Triple tokenizers
(golden fixture, see tests/fixtures/README.md), feature heads optional, and the
released full-size key layouts. No torch needed."""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fqgan_common
from genvis_jax import convert, models

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "fqgan_parity.npz")
TOL = 1e-5
BRANCHES = {"dual": ("vis", "sem"), "triple": ("vis", "sem_mid", "sem_high")}
HEADS = {"dual": {"sem": "feat_pred_head"},
         "triple": {"sem_mid": "mid_sem_feat_pred", "sem_high": "high_sem_feat_pred"}}


def _rel(got, want):
  """max |got - want| / max |want| in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def data():
  with np.load(FIX) as f:
    return {k: f[k] for k in f.files}


def _state(data, kind):
  """Official state dict of ``kind``; the Triple one reuses stored Dual arrays
  (trunk, decoder, vis branch; semantic_head_mid = the Dual semantic_head)."""
  def params(k):
    p = f"{k}/param/"
    return {n[len(p):]: v.astype(np.float32) for n, v in data.items()
            if n.startswith(p)}
  state = params(kind)
  if kind == "triple":
    dual = params("dual")
    for key, src in zip(data["triple/shared_keys"], data["triple/shared_from"]):
      assert key not in state
      state[str(key)] = dual[str(src)]
  return state


def _config(data, kind, state, heads=True):
  ch, nrb, dec_nrb, z, k, d, res, al, ah, fl, fh, *mult = (
      int(v) for v in data["config"])
  cfg = fqgan_common.fqgan_model(kind, 16)
  widths = {b: state[f"{h}.class_embedding"].shape[1]
            for b, h in HEADS[kind].items()}
  cfg.update(dict(image_size=res, hidden_channels=ch, channel_mult=tuple(mult),
                  num_res_blocks=nrb, decoder_res_blocks=dec_nrb, z_channels=z,
                  num_codes=k, code_dim=d, adapter_layers=al, adapter_heads=ah,
                  feat_layers=fl, feat_num_heads=fh,
                  feat_heads=tuple(widths.items()) if heads else ()))
  return cfg


def _outputs(model, params, images, codes):
  """Forward, latents, looked-up codes, feature-head tokens, decode."""
  def fn(m, x, c):
    recon, aux = m(x)
    quantized = {b: m.quantizers[b].lookup(cb) for b, cb in zip(m.branches, c)}
    tokens = {b: head(quantized[b])[:, 1:3] for b, head in m.heads.items()}
    return recon, aux, m.encode_latents(x), quantized, tokens, m.decode(c)
  return jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method=fn))(
      params, images, codes)


@pytest.mark.parametrize("kind", ["dual", "triple"])
def test_fqgan_matches_official_codes_reconstructions_and_features(data, kind):
  state = _state(data, kind)
  assert any(k.endswith("codebook_used") for k in state)  # buffers, dropped
  cfg = _config(data, kind, state)
  params = jax.tree_util.tree_map(jnp.asarray,
                                  convert.from_torch("fqgan", state, cfg))
  official = {k[len(kind) + 1:]: v for k, v in data.items()
              if k.startswith(kind + "/") and "/param/" not in k}
  codes = tuple(jnp.asarray(official[f"codes/{b}"]) for b in BRANCHES[kind])
  recon, aux, latents, quantized, tokens, decoded = _outputs(
      models.build(cfg), params, jnp.asarray(data["images"]), codes)
  for b, ours in zip(BRANCHES[kind], aux["codes"]):
    np.testing.assert_array_equal(np.asarray(ours), official[f"codes/{b}"])
    assert len(np.unique(official[f"codes/{b}"])) == cfg.num_codes  # all used
    assert _rel(latents[b], official[f"latent/{b}"]) <= TOL
    assert _rel(quantized[b], official[f"quantized/{b}"]) <= TOL
  assert _rel(recon, official["recon"]) <= TOL
  assert _rel(decoded, np.clip(official["decoded"], -1.0, 1.0)) <= TOL  # ours clips
  assert _rel(aux["disentangle_loss"], official["disentangle_loss"]) <= TOL
  assert set(aux["features"]) == set(HEADS[kind])
  for b in HEADS[kind]:
    assert _rel(aux["features"][b], official[f"feature/{b}"]) <= TOL
    assert _rel(tokens[b], official[f"feature_tokens/{b}"]) <= TOL
  # The branches really differ (a swapped branch mapping would fail above).
  assert _rel(official["latent/vis"], official[f"latent/{BRANCHES[kind][1]}"]) > 0.1


@pytest.mark.parametrize("kind", ["dual", "triple"])
def test_fqgan_without_feature_heads_drops_them(data, kind):
  state = _state(data, kind)
  with_heads = convert.from_torch("fqgan", state, _config(data, kind, state))
  without = convert.from_torch("fqgan", state,
                               _config(data, kind, state, heads=False))
  heads = set(HEADS[kind].values())
  assert heads <= set(with_heads) and not heads & set(without)
  rest = {k: v for k, v in with_heads.items() if k not in heads}
  assert (jax.tree_util.tree_structure(rest)
          == jax.tree_util.tree_structure(without))
  for a, b in zip(jax.tree_util.tree_leaves(rest),
                  jax.tree_util.tree_leaves(without)):
    np.testing.assert_array_equal(a, b)


def test_fqgan_config_with_heads_needs_them_in_the_checkpoint(data):
  state = _state(data, "dual")
  cfg = _config(data, "dual", state)
  bare = {k: v for k, v in state.items() if not k.startswith("feat_pred_head.")}
  with pytest.raises(ValueError, match=r"feat_pred_head.*model.feat_heads=\(\)"):
    convert.from_torch("fqgan", bare, cfg)
  # Triple's heads under Dual's config: the other variant, not "drop the
  # heads" (which led to a second mismatch).
  with pytest.raises(ValueError, match=r"checkpoint has others, \['high_sem_"
                     r"feat_pred', 'mid_sem_feat_pred'\]: it is the other "
                     r"FQGAN variant's"):
    convert.from_torch("fqgan", _state(data, "triple"), cfg)
  # Another model's file: the full comparison, not a head to drop.
  with pytest.raises(ValueError, match=r"missing") as e:
    convert.from_torch("fqgan", {"tok_embeddings.weight": np.zeros((4, 2))},
                       cfg)
  assert "feat_heads" not in str(e.value)


def test_fqgan_attention_weights_are_transposed_not_reshaped(data):
  state = _state(data, "triple")
  params = convert.from_torch("fqgan", state, _config(data, "triple", state))
  attn = params["encoder"]["semantic_head_high_0"]["transformer"]["block_1"]["attn"]
  prefix = "encoder.semantic_head_high.0.transformer.1.attn."
  np.testing.assert_array_equal(attn["qkv"]["kernel"],
                                state[prefix + "in_proj_weight"].T)
  np.testing.assert_array_equal(attn["qkv"]["bias"],
                                state[prefix + "in_proj_bias"])
  np.testing.assert_array_equal(attn["out"]["kernel"],
                                state[prefix + "out_proj.weight"].T)
  np.testing.assert_array_equal(
      params["high_sem_feat_pred"]["upscale_2"]["kernel"],
      state["high_sem_feat_pred.upscale.2.weight"].T)


def _official_shapes(kind, mult, ch=128, nrb=2, z=256, k=16384, d=8, heads=True):
  """Keys / torch shapes of the released FQGAN VQModel (vq_model_{dual,triple}.py
  built with with_clip_supervision=True): LlamaGen trunk + decoder, per branch a
  FactorizedAdapter (6 layers, width ch * mult[-1]) -> norm_out / conv_out ->
  quant_conv -> quantizer (+ codebook_used buffer), then the feature heads."""
  s, n = {}, len(mult)
  g = 256 // 2 ** (n - 1)

  def lin(name, o, i):
    s[name + ".weight"], s[name + ".bias"] = (o, i), (o,)

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
    for name in ("q", "k", "v", "proj_out"):
      conv(f"{p}.{name}", c, c, 1)

  def mid(p, c):
    res(p + ".mid.0", c, c), attn(p + ".mid.1", c), res(p + ".mid.2", c, c)

  def vit(p, w, layers):
    norm(p + ".ln_pre", w), norm(p + ".ln_post", w)
    for i in range(layers):
      b = f"{p}.transformer.{i}"
      norm(b + ".ln_1", w), norm(b + ".ln_2", w)
      s[b + ".attn.in_proj_weight"], s[b + ".attn.in_proj_bias"] = (3 * w, w), (3 * w,)
      lin(b + ".attn.out_proj", w, w)
      lin(b + ".mlp.c_fc", 4 * w, w), lin(b + ".mlp.c_proj", w, 4 * w)

  c = ch
  conv("encoder.conv_in", ch, 3, 3)
  for i, m in enumerate(mult):
    for j in range(nrb):
      res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
      c = ch * m
      if i == n - 1:
        attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
    if i != n - 1:
      conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
  mid("encoder", c)
  adapters = {"vis": "visual_head", "sem": "semantic_head",
              "sem_mid": "semantic_head_mid", "sem_high": "semantic_head_high"}
  for b in BRANCHES[kind]:
    vit(f"encoder.{adapters[b]}.0", c, 6)
    s[f"encoder.{adapters[b]}.0.positional_embedding"] = (g * g, c)
    norm(f"encoder.norm_out_{b}", c), conv(f"encoder.conv_out_{b}", z, c, 3)
    conv(f"quant_conv_{b}", d, z, 1)
    s[f"quantize_{b}.embedding.weight"] = (k, d)
    s[f"quantize_{b}.codebook_used"] = (65536,)
  conv("post_quant_conv", z, d * len(BRANCHES[kind]), 1)
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
  widths = {"dual": {"feat_pred_head": 1024},
            "triple": {"mid_sem_feat_pred": 384, "high_sem_feat_pred": 768}}
  for head, w in widths[kind].items():
    lin(head + ".upscale.0", w, d), lin(head + ".upscale.2", w, w)
    s[head + ".class_embedding"] = (1, w)
    s[head + ".positional_embedding"] = (g * g + 1, w)
    vit(head, w, 3)
  return s


# Counted on the official models built on torch's meta device (fixtures README).
OFFICIAL = {"dual_ds16": (552, 150_410_131), "dual_ds8": (508, 150_209_427),
            "triple_ds16": (683, 159_295_515), "triple_ds8": (639, 159_586_331)}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_fqgan_official_layouts_match_configs_exactly(name):
  kind, ds = name.split("_ds")
  shapes = _official_shapes(kind, fqgan_common.CHANNEL_MULT[int(ds)])
  num_keys, num_params = OFFICIAL[name]
  assert len(shapes) == num_keys
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, v) for k, v in shapes.items()}  # no memory
  cfg = importlib.import_module(f"configs.fqgan_{name}").get_config("fp32").model
  params = convert.from_torch("fqgan", state, cfg)  # raises on any mismatch
  assert models.count_params(params) == num_params
  if name == "dual_ds16":  # spelled out once (from_torch checks it for all)
    want = jax.eval_shape(lambda r: models.init_params(cfg, r), jax.random.key(0))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(
        lambda x: x.shape, want)
    tower = params["encoder"]["visual_head_0"]["transformer"]
    kernel = tower["block_5"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == (512, 1536)
    assert params["post_quant_conv"]["kernel"].shape == (1, 1, 16, 256)
    cfg.feat_heads = ()  # tokenizer only: the released heads are dropped
    bare = convert.from_torch("fqgan", state, cfg)
    assert "feat_pred_head" not in bare
    assert models.count_params(bare) == num_params - models.count_params(
        params["feat_pred_head"])
