"""How each tokenizer family's official code evaluates reconstructions
(``PROTOCOLS``, chosen by ``config.model.name`` or
``config.evaluate.protocol``): the eval crop, the uint8 bytes rFID sees, the
Inception resize and Inception Score, and whether PSNR / SSIM score the float
reconstruction or its bytes, with which SSIM recipe. ``evaluate.tokenizer``
measures by them."""

from __future__ import annotations

import dataclasses

from flax.core import FrozenDict

from genvis_jax import errors
from genvis_jax.data import transforms
from genvis_jax.models import inception as inception_model


SCORED = ("float", "bytes")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How one tokenizer family's official code evaluates reconstructions.

  to_uint8: the ``core.pixels.to_uint8`` method that makes the bytes rFID
    measures (originals and reconstructions alike) and the grid shows.
  crop: how the eval images are centre-cropped (``data.transforms
    .CENTER_CROPS``; ``config.data.center_crop`` overrides it).
  scored: what PSNR / SSIM / MSE compare with the original: the "float"
    reconstruction or its "bytes" (as LlamaGen's evaluation does).
  ssim: keyword arguments of ``ssim`` (its recipe).
  inception: the Inception resize of rFID ("adm_tf": TF1's bilinear, as
    ADM's evaluator and torch-fidelity do; "pytorch_fid").
  inception_score: (split size, eps) of the reconstructions' Inception
    Score (``fid.StreamingInceptionScore``), None where the official
    evaluation has none.
  source: the official code this follows.
  A ``scored`` outside ``SCORED`` raises ``ValueError``.
  """
  to_uint8: str
  crop: str = "adm"
  scored: str = "float"
  ssim: FrozenDict = FrozenDict()
  inception: str = "adm_tf"
  inception_score: tuple[int, float] | None = None
  source: str = ""

  def __post_init__(self):
    if self.scored not in SCORED:
      raise ValueError(f"Protocol.scored={self.scored!r}; one of {SCORED}.")


_LLAMAGEN = Protocol(
    "llamagen", scored="bytes",
    ssim=FrozenDict(window=7, gaussian=False, sample_covariance=True,
                    data_range=2.0),
    inception_score=(5000, 0.0),   # ADM's evaluator, which scores the npz
    source="LlamaGen tokenizer/tokenizer_image/reconstruction_vq_ddp.py "
           "(FQGAN tokenizer/reconstruction_vq_ddp_{dual,triple}.py): "
           "clamp(127.5 x + 128) bytes; skimage PSNR and SSIM(data_range=2) "
           "of bytes / 255; rFID of the bytes with ADM's evaluator")

# Tokenizer model name -> its official evaluation.
PROTOCOLS = {
    # Its evaluator truncates (x * 255).to(uint8) of round(x * 255) / 255
    # reconstructions and of originals on the byte grid: both exact, so the
    # bytes are the rounded ones. It has no PSNR / SSIM; ours score floats.
    "maskgit_vqgan": Protocol(
        "round", crop="torchvision", inception_score=(0, 1e-16),
        source="1d-tokenizer utils/train_utils.py eval_reconstruction, "
               "evaluator/ and data/webdataset_reader.py: Resize + "
               "CenterCrop, round(clamp(x, 0, 1) * 255) bytes, rFID with "
               "torch-fidelity's InceptionV3. Its eval images are the JPEG "
               "re-encodes data/convert_imagenet_to_wds.py writes; ours are "
               "the files as they are"),
    "llamagen_vq": _LLAMAGEN,
    "fqgan": _LLAMAGEN,
    # No official tokenizer evaluation: its validation loader's crop
    # (tokenizer/data/base.py), its sampler's bytes
    # (generator/engine_generator.py) and its FID's torch-fidelity Inception.
    "eq_tokenizer": Protocol(
        "round", crop="albumentations",
        source="Equivariant tokenizer/data/base.py ImagePaths (SmallestMaxSize "
               "+ CenterCrop), generator/engine_generator.py bytes, "
               "torch-fidelity Inception"),
}


def protocol(config) -> tuple[str, Protocol]:
  """(name, Protocol) of ``config.evaluate.protocol``, or ("" =) of
  ``config.model.name``. Raises ``errors.ConfigError`` for an unknown name."""
  chosen = config.evaluate.get("protocol", "")
  name = chosen or config.model.get("name", "")
  if name not in PROTOCOLS:
    what = (f"config.evaluate.protocol={chosen!r} is not one" if chosen else
            f"No official evaluation protocol is known for tokenizer "
            f"{name!r}; set --config.evaluate.protocol to the one it follows,")
    raise errors.ConfigError(f"{what} of {sorted(PROTOCOLS)}.")
  return name, PROTOCOLS[name]


def rfid_preprocess(ev, proto: Protocol) -> str:
  """Both sides of rFID go through our network: "auto" takes the protocol's
  resize. Raises ``errors.ConfigError`` for an unknown one."""
  p = ev.get("preprocess", "auto") or "auto"
  if p != "auto" and p not in inception_model.PREPROCESS:
    raise errors.ConfigError(
        f"config.evaluate.preprocess={p!r} is not an Inception resize; use "
        f"'auto' (the protocol's, {proto.inception!r}) or one of "
        f"{inception_model.PREPROCESS}.")
  return proto.inception if p == "auto" else p


def eval_data(config, name: str, proto: Protocol):
  """``config.data`` with the protocol's centre crop unless one is set.
  Raises ``errors.ConfigError`` for a crop the images cannot take, naming
  where it came from."""
  data = config.data.copy_and_resolve_references()
  explicit = data.get("center_crop", "")
  with data.unlocked():
    data.center_crop = explicit or proto.crop
  transforms.check_center_crop(
      data.center_crop, data.image_size, data.get("image_width", 0),
      origin="" if explicit else f"the {name} evaluation protocol's")
  return data
