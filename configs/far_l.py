"""FAR-L on ImageNet 256 (FQGAN ds16 codes): ``--config=configs/far_l.py:dual``
or ``:triple``; see configs/far_common.py."""

from configs import base
from configs import far_common


def get_config(arg=None):
  return base.finish(far_common.get_config("l", arg))
