"""Equivariant generator L on ImageNet 256 (see configs/eq_common.py)."""

from configs import eq_common


def get_config(arg=None):
  return eq_common.get_config("l", arg).lock()
