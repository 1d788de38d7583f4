"""Equivariant tokenizer training: its task (losses, GAN phases, the
official step-decay optimizer, stage 2), the DINO discriminator with
DiffAugment and the frozen ViT / teacher inputs (tiny configs on CPU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import eq_demo
from configs import eq_tokenizer as eq_tok_config
from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.convert import dino_vit
from genvis_jax.models import dino_disc
from genvis_jax.train import optimizers as opt_lib
from genvis_jax.train import step as step_lib
from genvis_jax.train.state import TrainState
from genvis_jax.train.tasks import eq as eq_task
from genvis_jax.train.tasks import eq_tokenizer as eqt_task
from genvis_jax.train.tasks import get_task
from tests.test_eq_tokenizer import abstract_params, mini_model, np_init


def test_step_decay_schedule_matches_official():
  f = opt_lib.step_decay_schedule(1.0, warmup=10, every=5, rate=0.2)
  got = [float(f(n)) for n in (0, 5, 9, 10, 14, 15, 20)]
  np.testing.assert_allclose(got, [0, 0.5, 0.9, 0.9, 0.9, 0.18, 0.036], rtol=1e-6)


def test_paper_optimizer_is_the_shared_one_with_its_step_decay():
  """The paper config's Adam + step decay is ``opt_lib.make_optimizer``: its
  state layout does not depend on grad_clip (a run resumes with another
  clip), and its learning rate follows the official schedule."""
  c = eq_tok_config.get_config()
  params = {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
  layouts = []
  for clip in (0.0, 1.0):
    c.train.grad_clip = clip
    state = opt_lib.make_optimizer(c.optimizer, c.train).init(params)
    layouts.append(jax.tree_util.tree_structure(state))
  assert layouts[0] == layouts[1]
  lr = opt_lib.make_schedule(c.optimizer, c.train.num_steps)
  assert float(lr(3000)) == pytest.approx(1.92e-4 * 2999 / 3000)
  assert float(lr(33_000)) == pytest.approx(1.92e-4 * 2999 / 3000 * 0.2)


def _task_config(disc="patchgan", stage2=False):
  c = eq_demo.eq_tokenizer_demo_config()
  c.model = mini_model()
  c.optimizer.warmup_steps = 0
  c.loss.disc_start = 0
  c.loss.stage2 = stage2
  c.train.global_batch_size = 4
  if disc == "dino":
    c.disc = eq_tok_config.dino_disc(img_size=16, patch_size=8, dim=32, depth=1,
                                      num_heads=2, key_depths=(0,),
                                      image_size=32, image_width=64,
                                      virtual_bs=2)
    c.disc.optimizer = eq_tok_config.get_config().disc.optimizer
  else:
    c.disc.ndf, c.disc.n_layers = 8, 1
  return c


@pytest.mark.parametrize("disc,stage2", [("patchgan", False), ("dino", True)])
def test_tokenizer_task_grads(disc, stage2):
  c = _task_config(disc, stage2)
  step = 1
  if disc == "patchgan":   # the GAN-on program of the test below: one compile
    c.loss.disc_start, step = 5, 6
  task = get_task(c)
  params = np_init(jax.eval_shape(lambda k: nn.unbox(task.init_params(k)),
                                  jax.random.key(0)))
  frozen = task.frozen_params()
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 32, 32, 3),
                                       minval=-1, maxval=1)}
  grads, metrics = jax.jit(task.grads)(params, frozen, batch, jax.random.key(2),
                                       jnp.int32(step))
  assert set(grads) == {"model", "disc"}
  for k in ("loss", "nll_loss", "kl_loss", "d_weight", "disc_loss", "g_loss"):
    assert np.isfinite(float(metrics[k])), k
  assert float(metrics["disc_factor"]) == 1.0 and float(metrics["d_weight"]) > 0
  gn = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(t)))
  assert gn(grads["model"]["decoder"]) > 0 and gn(grads["disc"]) > 0
  assert (gn(grads["model"]["encoder"]) == 0) == stage2
  if disc == "dino":
    assert "vit" not in grads["disc"] and "dino_vit" in frozen
    # Stage 2 steps the decoder, semantic decoder and post-quant layer only
    # (official configure_optimizers): the frozen groups do not move even
    # under a gradient (theirs is zero already; the freeze must not rely on it).
    assert set(eq_task.FROZEN_IN_STAGE2) == {"encoder", "quant_layer"}
    opt = task.optimizers()["model"]
    upd, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(
        jax.tree_util.tree_map(jnp.ones_like, grads["model"]), params["model"])
    assert gn(upd["encoder"]) == 0 and gn(upd["quant_layer"]) == 0
    assert gn(upd["decoder"]) > 0 and gn(upd["post_quant_layer"]) > 0


def test_discriminator_steps_on_the_updated_generator():
  """Official PL 1.4 loop: the generator's optimizer steps first, then the
  discriminator's step runs the updated generator again (fresh posterior
  draw: key fold_in(step key, 1))."""
  c = _task_config()
  task = get_task(c)
  assert task.update_phases == (("model",), ("disc",))
  params = np_init(jax.eval_shape(lambda k: nn.unbox(task.init_params(k)),
                                  jax.random.key(0)))
  opt = task.optimizers()
  opt_state = {g: opt[g].init(params[g]) for g in params}
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 32, 32, 3),
                                       minval=-1, maxval=1)}
  key, step = jax.random.key(2), jnp.int32(3)
  state = TrainState(step=step, params=params, opt_state=opt_state,
                     ema=params["model"])
  new, m = jax.jit(step_lib.make_train_step(task, opt, c.train, 1))(
      state, batch, key, {})
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["disc_loss"]))

  @jax.jit
  def by_hand(params, opt_state):
    k = jax.random.fold_in(key, step)
    g, _ = task.grads(params, {}, batch, k, step, groups=("model",))
    u, _ = opt["model"].update(g["model"], opt_state["model"], params["model"])
    model = optax.apply_updates(params["model"], u)
    g, _ = task.grads({**params, "model": model}, {}, batch,
                      jax.random.fold_in(k, 1), step, groups=("disc",))
    u, _ = opt["disc"].update(g["disc"], opt_state["disc"], params["disc"])
    # And the one-pass discriminator gradients (pre-update fakes).
    one_pass = task.grads(params, {}, batch, k, step, groups=("disc",))[0]["disc"]
    return model, optax.apply_updates(params["disc"], u), g["disc"], one_pass
  model, disc, g_disc, g_one = by_hand(params, opt_state)
  for a, b in zip(jax.tree_util.tree_leaves((new.params["model"], new.params["disc"])),
                  jax.tree_util.tree_leaves((model, disc))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(g_disc), jax.tree_util.tree_leaves(g_one)))
  assert diff > 1e-6


def test_gan_never_on_compiles_no_discriminator():
  """disc_start >= num_steps: the same model gradients as the GAN path before
  disc_start (weight 0), zero disc gradients, fewer convolutions."""
  on, off = _task_config(), _task_config()
  on.loss.disc_start, off.loss.disc_start = 5, 10**9
  on.train.num_steps = off.train.num_steps = 10
  t_on, t_off = get_task(on), get_task(off)
  assert t_on.use_gan and not t_off.use_gan
  params = np_init(jax.eval_shape(lambda k: nn.unbox(t_on.init_params(k)),
                                  jax.random.key(0)))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 32, 32, 3),
                                       minval=-1, maxval=1)}
  args = (params, {}, batch, jax.random.key(2), jnp.int32(0))
  # Each program traced and lowered once: run, and its text read below.
  low_on, low_off = (jax.jit(t.grads).lower(*args) for t in (t_on, t_off))
  g_on, m_on = low_on.compile()(*args)
  g_off, m_off = low_off.compile()(*args)
  np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_on["model"]),
                  jax.tree_util.tree_leaves(g_off["model"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  assert not any(np.any(np.asarray(g))
                 for g in jax.tree_util.tree_leaves(g_off["disc"]))
  count = lambda lowered: lowered.as_text().count("convolution")
  assert count(low_off) < count(low_on)


def test_diffaug_colour_is_the_officials():
  """DiffAugment's colour ops (official tokenizer/modules/discriminator/
  diffaug.py): brightness + (r - 0.5), saturation around the channel mean
  x 2r, contrast around the image mean x (r + 0.5), each r one draw per
  image (the saturation range changed unnoticed)."""
  x = jax.random.uniform(jax.random.key(0), (4, 4, 4, 3), minval=-1, maxval=1)
  key = jax.random.key(5)
  got = dino_disc.diff_augment(x, key, translation=0, color=True, cutout=0)
  r = np.asarray(jax.random.uniform(key, (7, 4), jnp.float32))  # its draws
  per = lambda v: v[:, None, None, None]
  want = np.asarray(x) + per(r[2] - 0.5)
  mean = want.mean(3, keepdims=True)
  want = (want - mean) * per(2 * r[3]) + mean
  mean = want.mean((1, 2, 3), keepdims=True)
  want = (want - mean) * per(r[4] + 0.5) + mean
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_dino_disc_and_diffaug():
  cfg = eq_tok_config.dino_disc(img_size=32, patch_size=8, dim=32, depth=3,
                                 num_heads=2, key_depths=(1, 2), image_size=48)
  model = models.build(cfg)
  params = np_init(abstract_params(cfg))
  assert set(params) == {"vit", "heads_0", "heads_1", "heads_2"}
  x = jax.random.uniform(jax.random.key(1), (4, 48, 48, 3), minval=-1, maxval=1)
  out = jax.jit(model.apply)({"params": params}, x, jax.random.key(2))
  assert out.shape == (4, 3 * 16)                     # 3 heads x 4x4 patches
  # Spectral norm: the normalised kernel has top singular value ~1.
  k = params["heads_0"]["res_conv"]["kernel"]
  w = np.asarray(dino_disc.spectral_normalize(k, 50)).transpose(2, 1, 0)
  np.testing.assert_allclose(np.linalg.norm(w.reshape(w.shape[0], -1), 2), 1.0,
                             rtol=1e-2)
  y = dino_disc.diff_augment(x, jax.random.key(3), translation=0, color=False,
                             cutout=0.25)
  zero = np.asarray(jnp.all(y == 0, axis=-1)).reshape(4, -1).mean(1)
  assert np.all(zero > 0) and np.all(zero <= 0.0625 + 1e-6)   # <= 12x12 of 48x48


def test_vit_params_from_state_dict_roundtrip(tmp_path):
  vit = dino_disc.FrozenViT(patch_size=8, dim=16, depth=2, num_heads=2,
                            pos_grid=2, final=True, layerscale=True)
  x = jnp.zeros((1, 16, 16, 3))
  p = np_init(nn.unbox(jax.eval_shape(vit.init, jax.random.key(0), x))["params"])
  e = p["embed"]
  sd = {"cls_token": np.asarray(e["cls_token"])[None, None],
        "pos_embed": np.asarray(e["pos_embed"])[None],
        "patch_embed.proj.weight": np.asarray(
            e["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": e["patch_embed"]["bias"],
        "norm.weight": p["norm"]["scale"], "norm.bias": p["norm"]["bias"],
        "head.weight": np.ones((3, 16), np.float32)}   # no place: skipped
  for i in range(2):
    b = p["encoder"][f"block_{i}"]
    for n in ("norm1", "norm2"):
      sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"] = (
          b[n]["scale"], b[n]["bias"])
    for n, q in (("attn.qkv", b["attn"]["qkv"]), ("attn.proj", b["attn"]["out"]),
                 ("mlp.fc1", b["mlp"]["fc1"]), ("mlp.fc2", b["mlp"]["fc2"])):
      sd[f"blocks.{i}.{n}.weight"] = np.asarray(q["kernel"]).T
      sd[f"blocks.{i}.{n}.bias"] = q["bias"]
    for n in ("ls1", "ls2"):
      sd[f"blocks.{i}.{n}.gamma"] = b[n]["scale"]
  back = dino_vit.convert_dino_vit(sd, zero_k_bias=True)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
  qb = back["encoder"]["block_0"]["attn"]["qkv"]["bias"]
  assert np.all(qb[16:32] == 0)
  np.testing.assert_array_equal(back["encoder"]["block_1"]["mlp"]["fc1"]["kernel"],
                                p["encoder"]["block_1"]["mlp"]["fc1"]["kernel"])
  np.savez(tmp_path / "vit.npz", **sd)           # read through convert.io
  loaded = dino_vit.load_dino_vit(str(tmp_path / "vit.npz"))
  np.testing.assert_array_equal(loaded["encoder"]["block_0"]["attn"]["qkv"]["bias"],
                                p["encoder"]["block_0"]["attn"]["qkv"]["bias"])
  with pytest.raises(FileNotFoundError, match="vit_path"):
    dino_vit.load_dino_vit(str(tmp_path / "missing.pth"))


def test_teacher_inputs_official_preprocess():
  """[-1, 1] -> ImageNet-normalised, torch-bicubic 224 x 224 (a constant image
  stays constant: the bicubic rows sum to 1)."""
  x = jnp.full((1, 256, 256, 3), 0.5)
  y = eq_task.teacher_inputs(x, 224)
  assert y.shape == (1, 224, 224, 3)
  expect = (0.75 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(y[0, 100, 7], expect, rtol=1e-5)


def test_stage2_config_is_the_official_stage2_yaml():
  """tokenizer_config_stage2.yaml differs from stage 1 in stage2: true and
  semantic_loss_w: 0.0 only; its ckpt_path loads the whole state dict: the
  discriminator too, and LitEma's update count (no second warm-up)."""
  one, two = eq_tok_config.get_config(), eq_tok_config.get_config("stage2")
  assert (one.loss.stage2, one.loss.semantic_weight) == (False, 5.0)
  assert (two.loss.stage2, two.loss.semantic_weight) == (True, 0.0)
  assert (one.init_groups, one.train.ema_warmup) == ((), True)
  assert (two.init_groups, two.train.ema_warmup) == (("disc",), False)
  two.loss.stage2, two.loss.semantic_weight = False, 5.0
  two.init_groups, two.train.ema_warmup = (), True
  assert two.to_dict() == one.to_dict()
  assert eq_tok_config.get_config("stage2,runlocal").loss.semantic_weight == 0.0


def test_a_fresh_stage_2_without_init_from_is_refused(tmp_path):
  """Stage 2 freezes the encoder and quant layer: started without stage 1's
  weights it trained a random encoder to the end without a word. Refused
  before the data are opened or anything is built or written, as a run
  whose init_groups name groups of an empty init_from is; a resume (a step
  of its own) passes."""
  from genvis_jax.errors import ConfigError   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer   # pylint: disable=import-outside-toplevel
  stage2 = eq_tok_config.get_config("stage2,runlocal")
  stage2.init_groups = ()
  wd = tmp_path / "wd"
  with pytest.raises(ConfigError, match=r"^config.init_from is empty, but "
                     r"stage 2 \(config.loss.stage2\) trains the decoder side "
                     r"alone .* Set --config.init_from=<the run"):
    trainer.train_loop(stage2, wd)
  assert not wd.exists()
  stage1 = eq_tok_config.get_config("runlocal")
  stage1.init_groups = ("disc",)
  with pytest.raises(ConfigError, match=r"init_groups=\('disc',\) names "):
    trainer.train_loop(stage1, wd)
  from genvis_jax.train import resume   # pylint: disable=import-outside-toplevel
  (wd / "checkpoints" / "4").mkdir(parents=True)
  resume.check_fresh_start(stage2, get_task(stage2), wd)


def test_stage_2_goes_on_with_stage_1s_discriminator(monkeypatch):
  """state.from_weights loads each config.init_groups group of init_from
  (the official init_from_ckpt loads the whole state dict: stage 2 keeps
  stage 1's discriminator), and the EMA starts at the loaded model. Orbax
  stubbed: what is read where (tests/test_reliability.py reads real runs)."""
  from genvis_jax.core import weights as weights_lib   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import state as state_lib   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(weights_lib, "resolve_all", list)
  monkeypatch.setattr(weights_lib, "restore_params", lambda pinned, abstract, group=None,
                      **kw: {"w": jnp.full(2, 7.0 if group == "disc" else 3.0)})
  zeros = {"w": jnp.zeros(2)}
  state = TrainState(step=jnp.int32(0), params={"model": zeros, "disc": zeros},
                     opt_state={}, ema=zeros)
  two = eq_tok_config.get_config("stage2,runlocal")
  two.init_from = "/run"
  assert tuple(two.init_groups) == ("disc",)
  got = state_lib.from_weights(state, two, state.params, "model")
  assert float(got.params["disc"]["w"][0]) == 7.0
  assert float(got.params["model"]["w"][0]) == float(got.ema["w"][0]) == 3.0


def _terms_of(**attrs):
  """``EqTokenizerTask.generator_terms`` on a stand-in task whose forward
  gives zeros, a 1x1 semantic map and KL 2.0, its other parts as given."""
  from types import SimpleNamespace   # pylint: disable=import-outside-toplevel
  task = SimpleNamespace(**{
      "_forward": lambda p, x, k: (x, jnp.ones((1, 1, 1, 1)), jnp.float32(2.0)),
      "use_lpips": False, "perceptual_weight": 1.0, "logvar_init": 0.0,
      "kl_weight": 0.0, "use_semantic": True, "semantic_weight": 5.0,
      "semantic_start": 10, "_semantic_loss": lambda fr, x, s: jnp.float32(1.0),
      "adversarial": lambda *a: jnp.float32(0.0), **attrs})
  return lambda step: eqt_task.EqTokenizerTask.generator_terms(
      task, {"model": {}}, None, {}, jnp.zeros((1, 2, 2, 3)),
      jax.random.key(0), jnp.int32(step))


def test_tokenizer_loss_terms_are_contperceptuals():
  """The official LPIPSWithDiscriminator (tokenizer/modules/losses/
  contperceptual.py): nll = rec / exp(logvar) + logvar summed per image over
  the batch; KL x kl_weight; the semantic term summed per image over the
  batch, x semantic_weight from semantic_iter_start on. Each was changed
  (logvar subtracted, KL unweighted, a mean for the sum, the start flipped)
  without a test failing."""
  x, r = jnp.zeros((2, 2, 2, 3)), jnp.ones((2, 2, 2, 3))
  nll, _ = eq_task.nll_loss(x, r, jnp.float32(1.0))
  np.testing.assert_allclose(float(nll), 12 * (np.exp(-1.0) + 1.0), rtol=1e-6)
  (total, _), (_, m) = _terms_of(kl_weight=0.5, use_semantic=False)(0)
  np.testing.assert_allclose(float(total - m["nll_loss"]), 0.5 * 2.0, rtol=1e-6)
  for step, factor in ((9, 0.0), (10, 5.0), (11, 5.0)):
    (total, _), (_, m) = _terms_of()(step)
    assert float(m["semantic_factor"]) == factor, step
    np.testing.assert_allclose(float(total - m["nll_loss"]), factor, rtol=1e-6)
  # The semantic loss itself: squared error summed over an image's patch
  # tokens and channels, over the batch (teacher tokens zero here).
  from types import SimpleNamespace   # pylint: disable=import-outside-toplevel
  b, h, w, c = 2, 2, 2, 3
  stand_in = SimpleNamespace(
      config=SimpleNamespace(loss=SimpleNamespace(
          teacher=SimpleNamespace(img_size=28))),
      teacher=SimpleNamespace(apply=lambda p, x: jnp.zeros((b, h * w, c))))
  sem = eqt_task.EqTokenizerTask._semantic_loss(   # pylint: disable=protected-access
      stand_in, {"teacher": {}}, jnp.zeros((b, 32, 32, 3)), jnp.ones((b, h, w, c)))
  np.testing.assert_allclose(float(sem), h * w * c, rtol=1e-6)


def test_the_semantic_teacher_takes_a_teacher_registry_name():
  """``config.loss.teacher.name``: the official's DINOv2 variant
  ("vit_b14") or the teacher registry's name, as FQGAN's
  ``config.teachers[i].name`` ("dinov2:vit_b14"): the same tower."""
  towers = []
  for name in ("vit_b14", "dinov2:vit_b14"):
    c = eq_tok_config.get_config("runlocal")
    c.model.semantic = True
    c.loss.teacher_path = "teacher.npz"   # not read: the tower is built only
    c.loss.teacher.name = name
    towers.append(eqt_task.EqTokenizerTask(c).teacher)
  assert towers[0] == towers[1]
  c.loss.teacher.name = "vit_q99"
  with pytest.raises(ConfigError, match="vit_q99"):
    eqt_task.EqTokenizerTask(c)
