"""RAR-L on ImageNet 256 (MaskGIT-VQ tokens); see configs/rar_common.py."""

from configs import base
from configs import rar_common


def get_config(arg=None):
  return base.finish(rar_common.get_config("l", arg))
