"""RAR-XXL on ImageNet 256 (MaskGIT-VQ tokens); see configs/rar_common.py."""

from configs import rar_common


def get_config(arg=None):
  return rar_common.get_config("xxl", arg).lock()
