"""The paper configs' training and sampling recipes hold the official values,
each read from the file that sets it (FQGAN's tokenizers:
tests/test_fqgan.py). A slip here trains or samples a different recipe with
every test passing."""

import pytest

from configs import eq_common
from configs import far_common
from configs import rar_common
from genvis_jax import models


# 1d-tokenizer README_RAR.md, "Reproducing RAR-*": randomize_temperature,
# guidance_scale, guidance_scale_pow of each size.
RAR_SAMPLING = {"b": (1.0, 16.0, 2.75), "l": (1.02, 15.5, 2.5),
                "xl": (1.02, 6.9, 1.5), "xxl": (1.02, 8.0, 1.2)}


@pytest.mark.parametrize("size", list(RAR_SAMPLING))
def test_rar_recipe_is_rar_yaml(size):
  """configs/training/generator/rar.yaml: AdamW (0.9, 0.96) wd 0.03, lr 4e-4
  cosine to 1e-5 after 62,500 warm-up steps, 250k steps at batch 2048
  (64 x 32 GPUs), clip 1.0, no EMA, randomness annealed over 125k-187.5k;
  the sampling of README_RAR.md."""
  c = rar_common.get_config(size)
  o = c.optimizer
  assert (o.name, o.lr, o.b1, o.b2, o.weight_decay) == (
      "adamw", 4e-4, 0.9, 0.96, 0.03)
  assert (o.schedule, o.warmup_steps, o.end_lr) == ("cosine", 62_500, 1e-5)
  t = c.train
  assert (t.global_batch_size, t.num_steps, t.grad_clip, t.ema_decay) == (
      2048, 250_000, 1.0, 0.0)
  assert (t.randomness_anneal_start, t.randomness_anneal_end) == (
      125_000, 187_500)
  s = c.sample
  assert (s.temperature, s.guidance_scale, s.guidance_pow) == RAR_SAMPLING[size]


@pytest.mark.parametrize("size", ["s", "b", "l", "h"])
def test_equivariant_recipe_is_train_generators(size):
  """EquivariantModeling scripts/train_generator.py defaults: AdamW (0.9,
  0.95) wd 0.02, lr = blr 1e-4 x batch / 256, clip 3.0, EMA 0.9999; the
  README's 1200 epochs at batch 2048 with 100 warm-up epochs, label
  dropout 0.1, window of 4 columns (``--cond_length 3``: the query's own
  column and 3 before), 16 condition tokens."""
  c = eq_common.get_config(size)
  o, t = c.optimizer, c.train
  assert (o.name, o.b1, o.b2, o.weight_decay, o.schedule) == (
      "adamw", 0.9, 0.95, 0.02, "constant")
  assert o.lr == pytest.approx(1e-4 * 2048 / 256)
  assert (t.global_batch_size, t.grad_clip, t.ema_decay, t.label_dropout) == (
      2048, 3.0, 0.9999, 0.1)
  epoch = 1_281_167 // 2048
  assert (t.num_steps, o.warmup_steps) == (1200 * epoch, 100 * epoch)
  model = models.build(c.model)
  assert (model.window, model.num_cond_tokens) == (4, 16)


@pytest.mark.parametrize("variant", ["dual", "triple"])
def test_far_recipe_is_train_c2i(variant):
  """FQGAN autoregressive/train/train_c2i_dual.py defaults (and
  train_far_*.sh): AdamW (0.9, 0.95) wd 0.05, lr 1e-4, clip 1.0, no EMA."""
  c = far_common.get_config("b", variant)
  o, t = c.optimizer, c.train
  assert (o.name, o.lr, o.b1, o.b2, o.weight_decay) == (
      "adamw", 1e-4, 0.9, 0.95, 0.05)
  assert (t.grad_clip, t.ema_decay) == (1.0, 0.0)
