"""Equivariant generator S on ImageNet 256 (see configs/eq_common.py)."""

from configs import base
from configs import eq_common


def get_config(arg=None):
  return base.finish(eq_common.get_config("s", arg))
