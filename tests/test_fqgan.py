"""FQGAN: shapes, round trip, sub-codebook metrics, official sizes and names,
disentanglement and InfoNCE values and gradients, teachers, a sharded step."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import (fqgan_demo, fqgan_dual_ds8, fqgan_dual_ds16,
                     fqgan_triple_ds8, fqgan_triple_ds16)
from genvis_jax import models
from genvis_jax.convert import clip_vision as convert_clip
from genvis_jax.models import clip_vision, fqgan
from genvis_jax.models import teachers as teachers_lib
from genvis_jax.core import sharding as shd
from genvis_jax.train import trainer as trainer_lib
from genvis_jax.train.state import TrainState
from genvis_jax.train.tasks import fq_tokenizer as fqt

HW = 16
HEAD_W = 16


def _tiny_model(kind="dual", channel_mult=(1, 1), image_size=HW):
  m = ml_collections.ConfigDict(dict(
      name="fqgan", image_size=image_size, hidden_channels=32,
      channel_mult=channel_mult, num_res_blocks=1, decoder_res_blocks=1,
      z_channels=32, num_codes=32, code_dim=8, entropy_weight=0.03,
      commitment_cost=0.5,
      adapter_layers=1, adapter_heads=2, feat_layers=1, feat_num_heads=2,
      dtype="float32", param_dtype="float32"))
  if kind == "dual":
    m.branches, m.feat_heads = ("vis", "sem"), (("sem", HEAD_W),)
  else:
    m.branches = ("vis", "sem_mid", "sem_high")
    m.feat_heads = (("sem_mid", HEAD_W), ("sem_high", 24))
  return m


def _random_params(shapes, seed):
  """Numpy-filled params of a shape tree (a jitted init takes ~10 s to
  compile on CPU): norms at identity, kernels ~ N(0, 1/fan_in), tables N(0, 1)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(s.shape, np.float32)
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    fan_in = np.prod(s.shape[:-1]) if name == "kernel" else 1
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _teacher_file(tmp_path, width=HEAD_W):
  kwargs = dict(image_size=16, patch_size=8, width=width, num_layers=1,
                num_heads=2)
  module, _ = teachers_lib.get_teacher("teachers:vit", **kwargs)
  shapes = jax.eval_shape(module.init, jax.random.key(7),
                          jnp.zeros((1, 16, 16, 3)))["params"]
  params = _random_params(nn.unbox(shapes), 7)
  path = str(tmp_path / f"teacher_{width}.npz")
  convert_clip.save_teacher_params(path, params)
  return path, kwargs


def _task_config(tmp_path, model=None):
  c = fqgan_demo.fq_tokenizer_demo_config()
  c.model = model or _tiny_model()
  c.data.image_size = HW
  c.disc.image_size = HW
  c.disc.n_layers = 1
  c.loss.disc_start = 0
  c.loss.rep_group_size = 4
  c.train.global_batch_size = 8
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1))
  path, kwargs = _teacher_file(tmp_path)
  c.teachers = (ml_collections.ConfigDict(dict(
      name="teachers:vit", path=path, head="sem",
      kwargs=ml_collections.ConfigDict(kwargs))),)
  return c


@pytest.fixture(scope="module")
def tiny_params():
  """Random parameters of the tiny dual model (no init compile)."""
  cfg = _tiny_model()
  return _random_params(jax.eval_shape(
      lambda r: models.init_params(cfg, r), jax.random.key(0)), 0)


def test_forward_round_trip_and_sub_codebook_metrics(tiny_params):
  model = models.build(_tiny_model())
  images = jax.random.uniform(jax.random.key(1), (2, HW, HW, 3), minval=-1.0)

  @jax.jit
  def run(params, x):
    recon, aux = model.apply({"params": params}, x)
    codes = model.apply({"params": params}, x, method="encode")
    quantized = model.apply({"params": params}, codes, method=lambda m, cs: [
        m.quantizers[b].lookup(c) for b, c in zip(m.branches, cs)])
    return recon, aux, codes, model.apply({"params": params}, codes,
                                          method="decode"), quantized

  recon, aux, codes, decoded, quantized = run(tiny_params, images)
  # Eq. 7 on the sub-codebooks' code vectors (official vq_model_dual.py:
  # quant_vis, quant_sem), not on the encoder's latents.
  np.testing.assert_allclose(float(aux["disentangle_loss"]),
                             float(fqgan.disentangle_loss(quantized)), rtol=1e-5)
  assert recon.shape == images.shape and recon.dtype == jnp.float32
  assert isinstance(codes, tuple) and len(codes) == 2
  for c, c_aux in zip(codes, aux["codes"]):
    assert c.shape == (2, 8, 8) and c.dtype == jnp.int32
    assert int(c.min()) >= 0 and int(c.max()) < 32
    np.testing.assert_array_equal(c, c_aux)
  # decode(encode(x)) is the clipped quantized reconstruction.
  np.testing.assert_allclose(decoded, jnp.clip(recon, -1, 1), atol=1e-4)
  for b in ("vis", "sem"):
    for k in ("usage", "perplexity", "codebook_loss", "commitment_loss",
              "entropy_loss", "quantizer_loss"):
      v = float(aux[f"{k}/{b}"])
      assert np.isfinite(v), (k, b)
    # Each sub-codebook's total weighs its terms by the config's commitment
    # cost (0.5, not the default) and entropy weight.
    np.testing.assert_allclose(
        aux[f"quantizer_loss/{b}"], aux[f"codebook_loss/{b}"]
        + 0.5 * aux[f"commitment_loss/{b}"] + 0.03 * aux[f"entropy_loss/{b}"], rtol=1e-5)
    assert 0.0 < float(aux[f"usage/{b}"]) <= 1.0
    assert 1.0 <= float(aux[f"perplexity/{b}"]) <= 32.0
  np.testing.assert_allclose(
      aux["quantizer_loss"], aux["quantizer_loss/vis"] + aux["quantizer_loss/sem"],
      rtol=1e-6)
  np.testing.assert_allclose(
      aux["usage"], (aux["usage/vis"] + aux["usage/sem"]) / 2, rtol=1e-6)
  assert 0.0 <= float(aux["disentangle_loss"]) <= 1.0
  assert aux["features"]["sem"].shape == (2, HEAD_W)


@pytest.mark.parametrize("kind", ["dual", "triple"])
@pytest.mark.parametrize("channel_mult,grid", [((1, 1, 1, 1, 1), 2),
                                               ((1, 1, 1, 1), 4)])
def test_tiny_ds16_ds8_shapes(kind, channel_mult, grid):
  cfg = _tiny_model(kind, channel_mult, image_size=32)
  model = models.build(cfg)

  def run(rng, x):
    params = models.init_params(cfg, rng)
    recon, aux = model.apply({"params": params}, x)
    codes = model.apply({"params": params}, x, method="encode")
    return recon, aux, codes, model.apply({"params": params}, codes,
                                          method="decode")

  x = jnp.zeros((2, 32, 32, 3))
  recon, aux, codes, decoded = jax.eval_shape(run, jax.random.key(0), x)
  assert recon.shape == decoded.shape == x.shape
  assert len(codes) == len(cfg.branches)
  assert all(c.shape == (2, grid, grid) and c.dtype == jnp.int32 for c in codes)
  assert {b: f.shape for b, f in aux["features"].items()} == {
      b: (2, w) for b, w in cfg.feat_heads}


# Official parameter counts (showlab/FQGAN tokenizer/vq_model_{dual,triple}.py
# with with_clip_supervision=True, i.e. the released checkpoints that include
# the feature heads), counted from the module shapes:
#   trunk (LlamaGen encoder up to mid): ds16 28,117,248 / ds8 26,343,680
#   per branch: FactorizedAdapter(grid^2*512 pos + ln_pre + 6 blocks of
#     3,152,384 + ln_post) + GroupNorm(512) + conv3x3 512->256 (1,179,904)
#     + quant_conv 256->8 (2,056) + codebook 16384x8 (131,072)
#   post_quant_conv 8k->256; LlamaGen decoder 42,449,795 (both ds);
#   FeatPredHead(W): 8W+W + W^2+W + W (cls) + (grid^2+1)W + 2*2W (ln) + 3
#     blocks of 12W^2+13W; Dual W=1024, Triple W=384 and 768.
OFFICIAL_COUNTS = [(fqgan_dual_ds16, 150_410_131), (fqgan_dual_ds8, 150_209_427),
                   (fqgan_triple_ds16, 159_295_515),
                   (fqgan_triple_ds8, 159_586_331)]


@pytest.mark.parametrize("mod,expected", OFFICIAL_COUNTS)
def test_paper_parameter_counts_and_names(mod, expected):
  cfg = mod.get_config().model
  boxed = jax.eval_shape(lambda r: models.init_params(cfg, r, boxed=True),
                         jax.random.key(0))
  assert models.count_params(boxed) == expected
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  p = nn.unbox(boxed)
  grid = 256 // 2 ** (len(cfg.channel_mult) - 1)
  enc = p["encoder"]
  assert "norm_out" not in enc and "conv_out" not in enc
  for b in cfg.branches:
    ad = enc[f"{fqgan.adapter_name(b)}_0"]
    assert ad["positional_embedding"].shape == (grid * grid, 512)
    assert ad["transformer"]["block_5"]["attn"]["qkv"]["kernel"].shape == (512, 1536)
    assert ad["transformer"]["block_5"]["mlp"]["fc1"]["kernel"].shape == (512, 2048)
    assert enc[f"conv_out_{b}"]["kernel"].shape == (3, 3, 512, 256)
    assert f"norm_out_{b}" in enc
    assert p[f"quant_conv_{b}"]["kernel"].shape == (1, 1, 256, 8)
    assert p[f"quantize_{b}"]["embedding"].shape == (16384, 8)
  k = len(cfg.branches)
  assert p["post_quant_conv"]["kernel"].shape == (1, 1, 8 * k, 256)
  names = {"dual": {"feat_pred_head"},
           "triple": {"mid_sem_feat_pred", "high_sem_feat_pred"}}
  assert {n for n in p if "feat_pred" in n} == names["dual" if k == 2 else "triple"]
  for b, w in cfg.feat_heads:
    head = p[fqgan.feat_head_name(b)]
    assert head["positional_embedding"].shape == (grid * grid + 1, w)
    assert head["class_embedding"].shape == (1, w)
    assert head["upscale_0"]["kernel"].shape == (8, w)
    assert "block_2" in head["transformer"] and "ln_pre" in head and "ln_post" in head
  assert "semantic_head_0" in enc if k == 2 else "semantic_head_high_0" in enc


def _np_unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_disentangle_loss_matches_numpy():
  rng = np.random.default_rng(0)
  q = [rng.normal(size=(2, 3, 4, 8)).astype(np.float32) for _ in range(3)]
  dot2 = lambda a, b: np.mean(np.sum(_np_unit(a) * _np_unit(b), -1) ** 2)
  np.testing.assert_allclose(fqgan.disentangle_loss(q[:2]), dot2(q[0], q[1]),
                             rtol=1e-5)
  want3 = (dot2(q[0], q[1]) + dot2(q[0], q[2]) + dot2(q[1], q[2])) / 3
  np.testing.assert_allclose(fqgan.disentangle_loss(q), want3, rtol=1e-5)
  assert float(fqgan.disentangle_loss(q[:1])) == 0.0
  # Orthogonal features -> 0, parallel -> 1.
  e = np.eye(8, dtype=np.float32)
  assert float(fqgan.disentangle_loss([e[:1], e[1:2]])) == 0.0
  np.testing.assert_allclose(fqgan.disentangle_loss([e[:1], 3 * e[:1]]), 1.0)


def _np_info_nce(p, t):
  logits = _np_unit(p) @ _np_unit(t).T
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -np.mean(np.diag(logp))


def test_info_nce_matches_numpy_and_stops_teacher_gradient():
  rng = np.random.default_rng(1)
  p = rng.normal(size=(6, 5)).astype(np.float32)
  t = rng.normal(size=(6, 5)).astype(np.float32)
  np.testing.assert_allclose(fqt.info_nce(p, t), _np_info_nce(p, t), rtol=1e-5)
  grouped = (_np_info_nce(p[:3], t[:3]) + _np_info_nce(p[3:], t[3:])) / 2
  np.testing.assert_allclose(fqt.info_nce(p, t, group_size=3), grouped,
                             rtol=1e-5)
  g_t = jax.grad(lambda tt: fqt.info_nce(p, tt))(jnp.asarray(t))
  assert float(jnp.abs(g_t).max()) == 0.0
  g_p = jax.grad(lambda pp: fqt.info_nce(pp, t))(jnp.asarray(p))
  assert float(jnp.abs(g_p).max()) > 0.0
  with pytest.raises(ValueError, match="teacher features"):
    fqt.info_nce(p, t[:, :4])


def _nonzero(tree) -> bool:
  return any(float(jnp.abs(x).max()) > 0 for x in jax.tree_util.tree_leaves(tree))


def test_disentangle_and_representation_gradients(tmp_path, tiny_params):
  """Eq. 7 reaches the encoder, not the codebooks; the representation loss
  alone (random-weight teacher) reaches the encoder trunk through the sem
  branch's straight-through codes."""
  config = _task_config(tmp_path)
  task = fqt.FQTokenizerTask(config)
  assert task.use_rep and [t.head for t in task.teachers] == ["sem"]
  frozen = task.frozen_params()
  images = jax.random.uniform(jax.random.key(3), (4, HW, HW, 3), minval=-1.0)

  @jax.jit
  def grads(params):
    def losses(p):
      aux = task.model.apply({"params": p}, images)[1]
      rep = task.representation_losses(frozen, images, aux["features"])
      return aux["disentangle_loss"], rep["sem"]
    (dis, rep), vjp = jax.vjp(losses, params)
    one, zero = jnp.ones(()), jnp.zeros(())
    return dis, vjp((one, zero))[0], rep, vjp((zero, one))[0]

  d_val, g_dis, r_val, g_rep = grads(tiny_params)
  assert np.isfinite(float(d_val)) and float(d_val) > 0
  assert _nonzero(g_dis["encoder"]["conv_in"])
  assert _nonzero(g_dis["encoder"]["visual_head_0"])
  assert _nonzero(g_dis["encoder"]["semantic_head_0"])
  for b in ("vis", "sem"):
    assert not _nonzero(g_dis[f"quantize_{b}"]), b
  assert not _nonzero(g_dis["decoder"])

  # log(batch group 4) is the loss of an uninformative predictor.
  assert 0.0 < float(r_val) < 2 * np.log(4)
  assert _nonzero(g_rep["encoder"]["conv_in"])
  assert _nonzero(g_rep["encoder"]["mid_0"])
  assert _nonzero(g_rep["encoder"]["semantic_head_0"])
  assert _nonzero(g_rep["quant_conv_sem"])
  assert _nonzero(g_rep["feat_pred_head"])
  assert not _nonzero(g_rep["encoder"]["visual_head_0"])
  assert not _nonzero(g_rep["quantize_sem"])
  assert not _nonzero(g_rep["decoder"])

  # The discriminator's gradients are scaled by loss.disc_loss_weight before
  # clipping and Adam (official: the D loss is multiplied by the GAN weight),
  # so Adam's first moment holds (1 - b1) w g; a scale after Adam would leave
  # the moments unscaled and halve the learning rate instead.
  w, b1 = float(config.loss.disc_loss_weight), float(config.disc.optimizer.b1)
  assert w != 1.0
  tx = task.optimizers()["disc"]
  p, g = {"kernel": jnp.ones(3)}, {"kernel": jnp.array([0.1, -0.2, 0.3])}
  state = tx.update(g, tx.init(p), p)[1]
  adam = next(s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  np.testing.assert_allclose(adam.mu["kernel"], (1 - b1) * w * g["kernel"], rtol=1e-6)


def test_sharded_train_step_with_teacher(tmp_path):
  config = _task_config(tmp_path)
  tr = trainer_lib.Trainer(config, mesh=shd.create_mesh(config.mesh))
  assert set(tr.frozen) == {"teachers"}
  # The teacher is split over fsdp as trained weights are, not replicated.
  block = tr.frozen["teachers"]["sem"]["encoder"]["block_0"]
  for kernel in (block["attn"]["qkv"]["kernel"], block["mlp"]["fc1"]["kernel"]):
    assert kernel.addressable_shards[0].data.size == kernel.size // 2
  # Drawn on the host and placed on the mesh: the sharded initialiser's
  # compile (12 s) was most of this test (the FQGAN pipeline runs it).
  params = {g: _random_params(p, i) for i, (g, p)
            in enumerate(tr.abstract_state().params.items())}
  state = jax.device_put(TrainState(
      step=np.int32(0), params=params,
      opt_state={g: tr.optimizers[g].init(p) for g, p in params.items()},
      ema=params[tr.task.ema_group]), tr.shardings)
  r = np.random.RandomState(0)
  batch = {"image": (r.rand(8, HW, HW, 3) * 2 - 1).astype(np.float32),
           "label": np.zeros(8, np.int32)}
  state, m = tr.step(state, batch)
  assert np.isfinite(float(m["loss"])) and float(m["nonfinite"]) == 0.0
  for k in ("rep_loss/sem", "disentangle_loss", "usage/vis", "usage/sem",
            "perplexity/vis", "perplexity/sem", "disc_loss", "rec_loss"):
    assert k in m and np.isfinite(float(m[k])), k
  assert float(m["grad_norm/model"]) > 0 and float(m["grad_norm/disc"]) > 0
  assert float(m["adv_weight"]) == 0.5
  assert int(state.step) == 1


def test_teacher_interface():
  x = jnp.arange(256, dtype=jnp.float32).reshape(1, 256, 1, 1)
  x = jnp.broadcast_to(x, (1, 256, 256, 1))
  y = clip_vision.resize_nearest(x, 224, 224)
  # torch F.interpolate(mode="nearest"): out[i] = in[floor(i * 256 / 224)].
  np.testing.assert_array_equal(y[0, :, 0, 0], np.floor(np.arange(224) * 8 / 7))
  _, pre = teachers_lib.get_teacher("teachers:vit", image_size=32)
  out = pre(-jnp.ones((1, 64, 64, 3)))
  np.testing.assert_allclose(
      out[0, 0, 0], -np.array(teachers_lib.OPENAI_CLIP_MEAN) /
      np.array(teachers_lib.OPENAI_CLIP_STD), rtol=1e-6)
  assert out.shape == (1, 32, 32, 3)
  with pytest.raises(ValueError, match="Unknown teacher"):
    teachers_lib.get_teacher("clip_vit_huge")
  with pytest.raises(FileNotFoundError, match="not found"):
    convert_clip.load_teacher_params("/nonexistent/teacher.npz")


def test_rep_loss_off_without_teacher_file_and_config_errors(tmp_path, caplog):
  config = _task_config(tmp_path)
  config.teachers[0].path = ""
  with caplog.at_level(logging.WARNING):
    task = fqt.FQTokenizerTask(config)
  assert not task.use_rep and task.frozen_params() == {}
  assert "Representation loss" in caplog.text and "OFF" in caplog.text

  path, kwargs = _teacher_file(tmp_path, width=24)   # head "sem" predicts 16
  config.teachers[0].path = path
  config.teachers[0].kwargs = ml_collections.ConfigDict(kwargs)
  with pytest.raises(ValueError, match="CLS features of shape"):
    fqt.FQTokenizerTask(config).frozen_params()
  config.teachers[0].kwargs.width = 16                # weights are 24 wide
  with pytest.raises(ValueError, match="do not fit"):
    fqt.FQTokenizerTask(config).frozen_params()

  config.teachers[0].head = "vis"
  with pytest.raises(ValueError, match="feat_heads"):
    fqt.FQTokenizerTask(config)
  bad = _tiny_model()
  bad.feat_heads = (("semantic", 16),)
  with pytest.raises(ValueError, match="branches"):
    jax.eval_shape(lambda r: models.init_params(bad, r), jax.random.key(0))
  bad = _tiny_model()
  bad.adapter_width = 64
  with pytest.raises(ValueError, match="adapter_width"):
    models.build(bad)
  model = models.build(_tiny_model())
  params = jax.eval_shape(lambda r: models.init_params(_tiny_model(), r),
                          jax.random.key(0))
  with pytest.raises(ValueError, match="tuple of 2 code maps"):
    jax.eval_shape(lambda p: model.apply(
        {"params": p}, jnp.zeros((1, 8, 8), jnp.int32), method="decode"), params)
  with pytest.raises(ValueError, match="16x16"):
    jax.eval_shape(lambda p: model.apply(
        {"params": p}, jnp.zeros((1, 32, 32, 3))), params)


def test_paper_config_hyper_parameters():
  c = fqgan_dual_ds16.get_config()
  assert c.task == "fq_tokenizer" and c.model.name == "fqgan"
  assert c.train.global_batch_size == 256 and c.train.ema_decay == 0.0
  assert c.train.grad_clip == 1.0 and c.train.num_steps == 40 * 5004
  for o in (c.optimizer, c.disc.optimizer):
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.schedule) == (
        2e-4, 0.9, 0.95, 0.0, "constant")
  lo = c.loss
  assert (lo.reconstruction, lo.reconstruction_weight, lo.perceptual_weight) == (
      "l2", 1.0, 1.0)
  # GAN on from the 20,000th update: official global_step = train_steps + 1
  # against --disc-start 20000; our step counts from 0.
  assert (lo.gan, lo.gan_weight, lo.disc_start, lo.adaptive_gan_weight) == (
      "hinge", 0.5, 19_999, False)
  assert (lo.disentangle_weight, lo.rep_weight) == (0.1, 0.5)
  # Batch-coupled terms per official GPU batch (256 / 8).
  assert lo.rep_group_size == c.model.entropy_group_size == 32
  assert c.model.entropy_weight == 0.03 and c.model.dtype == "bfloat16"
  assert fqgan_dual_ds16.get_config("fp32").model.dtype == "float32"
  assert models.value_range(c.model) == (-1.0, 1.0) and c.data.crop_min_frac == 0.8
  assert c.data.source == "tfds" and c.data.name == "imagenet2012"
  assert [t.head for t in fqgan_triple_ds8.get_config().teachers] == [
      "sem_mid", "sem_high"]
  with pytest.raises(ValueError, match="fp32"):
    fqgan_dual_ds16.get_config("fp16")


def test_the_single_codebook_vq_takes_llamagens_own_launch():
  """vq_ds16 / vq_ds8 train with FQGAN's recipe; ``:llamagen`` is LlamaGen's
  train_vq.sh (vq_train.py's defaults: lr 1e-4 for both optimizers, batch
  128, 40 epochs of 1,281,167 // 128 steps), the rest unchanged."""
  from configs import vq_ds8, vq_ds16  # pylint: disable=import-outside-toplevel
  for mod in (vq_ds16, vq_ds8):
    fq, lg = mod.get_config(), mod.get_config("llamagen")
    assert (fq.optimizer.lr, fq.train.global_batch_size) == (2e-4, 256)
    assert (lg.optimizer.lr, lg.disc.optimizer.lr) == (1e-4, 1e-4)
    assert (lg.train.global_batch_size, lg.train.num_steps) == (128, 400_360)
    assert lg.loss.to_dict() == fq.loss.to_dict()
    assert lg.model.to_dict() == fq.model.to_dict()
    assert mod.get_config("fp32,llamagen").model.dtype == "float32"
  with pytest.raises(ValueError, match="llamagen is LlamaGen's recipe"):
    fqgan_dual_ds16.get_config("llamagen")


def test_the_total_loss_weights_the_disentanglement_term(tmp_path):
  """The loss adds ``disentangle_weight`` x eq. 7 (official: 0.1 of it);
  the tests checked the unweighted term and its gradients, so a total
  with the term at any weight, or none, passed."""
  c = _task_config(tmp_path)
  c.loss.disentangle_weight = 0.1
  c.teachers = ()
  task = fqt.FQTokenizerTask(c)
  got = task.extra_terms(jnp.float32(1.0), {}, None,
                         {"disentangle_loss": jnp.float32(0.5)}, {})
  np.testing.assert_allclose(float(got), 1.05, rtol=1e-6)
