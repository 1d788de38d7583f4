"""Shared defaults for every runnable config. Model files state only what differs.

Usage in a config file::

    from configs import base
    def get_config(arg=None):
      config = base.get_config()
      config.model = ...
      return base.finish(config)

``finish`` locks the config and refuses a key that resembles one the configs
use (``config.train.ema_decy``), naming it; a key of one's own goes in after
it, under ``with config.unlocked():``.
"""

import ml_collections

# Logical axis -> mesh axis rules: the package's one table, defined beside the
# sharding code that also uses it when no config is at hand.
from genvis_jax.core.sharding import DEFAULT_RULES
# Sections holding a model's settings (``name`` = a module of
# genvis_jax.models), at any depth: config.model, config.disc,
# config.tokenizer.model, config.stages.<stage>.model ...
from genvis_jax.core.checkpoint_fit import MODEL_SECTIONS


# ImageNet-1k training images: the official recipes count an epoch as
# IMAGENET_TRAIN // global batch steps (PyTorch DistributedSampler + drop_last).
IMAGENET_TRAIN = 1_281_167


def steps_per_epoch(batch: int) -> int:
  """Full batches per ImageNet-1k epoch (the official loaders drop the rest)."""
  return IMAGENET_TRAIN // batch


def parse_arg(arg, *, positional=(), **defaults) -> ml_collections.ConfigDict:
  """The config argument (``--config=configs/X.py:ARG``) as fields.

  big_vision's convention: comma-separated tokens, ``key=value`` or a bare
  name. A bare name of a boolean default sets it (``runlocal``); any other
  bare token fills the next ``positional`` field (``dual``). Values take the
  default's type. E.g. ``parse_arg("dual,runlocal", positional=("variant",),
  variant="dual", runlocal=False)`` -> ``variant="dual", runlocal=True``.

  ``given`` lists the fields the argument set (e.g. a ``batch=N`` that
  ``runlocal`` keeps instead of its own).

  Raises ValueError naming the token and the accepted ones.
  """
  if "given" in defaults:
    raise ValueError("'given' is parse_arg's own field; name the argument "
                     "otherwise.")
  out = ml_collections.ConfigDict(defaults)
  given = []
  free = list(positional)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, value = token.partition("=")
    if not eq and isinstance(defaults.get(key), bool):
      out[key] = True
      given.append(key)
      continue
    if not eq and free:
      key, value = free.pop(0), token
    if key not in defaults or (not eq and key == token):
      if not defaults:
        raise ValueError(f"Unknown config argument {token!r}; this config "
                         "takes none.")
      accepted = [f"{k} (a flag)" if isinstance(v, bool) else
                  f"{k} (default {v!r})" for k, v in sorted(defaults.items())]
      example = [str(defaults[p]) for p in positional] + [
          k for k, v in defaults.items() if isinstance(v, bool)][:1]
      raise ValueError(
          f"Unknown config argument {token!r}; this config takes "
          f"{', '.join(accepted)}, comma-separated (e.g. "
          f"--config=configs/X.py:{','.join(example)}).")
    default = defaults[key]
    if isinstance(default, bool):
      # runlocal=on must not run the paper config: only these are read.
      words = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}
      if value.lower() not in words:
        raise ValueError(
            f"Config argument {token!r}: {key} is a flag: give it bare "
            f"({key}) or as {key}=true / {key}=false.")
      out[key] = words[value.lower()]
    elif default is None:
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        kind = type(default).__name__
        raise ValueError(
            f"Config argument {token!r}: {key} takes "
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} (default "
            f"{default!r}).") from None
      if isinstance(default, int) and out[key] <= 0:
        raise ValueError(f"Config argument {token!r}: {key} must be positive.")
    given.append(key)
  out.given = tuple(given)
  return out


def runlocal_data(d, *, source="demo", image_size=32, num_classes=10,
                  num_examples=512):
  """``runlocal``: the embedded demo data set (no download), small images."""
  d.source = source
  d.name = "shapes" if source == "demo" else "landscapes"
  d.path = ""
  d.image_size = image_size
  d.num_classes = num_classes
  d.num_examples = num_examples   # per split, demo sources only
  d.read_threads = 2
  return d


def runlocal_train(t, *, steps=20, batch=8):
  """``runlocal``: a few steps at a small batch; logs, checkpoints and
  sample grids still happen (four and two times).

  The cadences (and the EMA horizon) follow ``t.num_steps`` by reference, so
  ``--config.train.num_steps=1000`` still logs four times and checkpoints
  twice; schedule points of the recipes' runlocal configs use
  :func:`steps_fraction` for the same reason. So a run resumed with more
  steps moves its schedule too (the trainer logs the config difference).
  """
  t.global_batch_size = batch
  t.num_steps = steps
  t.log_every = steps_fraction(t, 1, 4)
  t.checkpoint_every = steps_fraction(t, 1, 2)
  t.image_every = steps_fraction(t, 1, 2)
  t.keep_checkpoints = 2
  # An EMA still runs where the recipe has one, over ~steps / 5 + 1 steps
  # (decay steps / (steps + 5): 0.8 at 20 steps, and > 0 for any count).
  if t.ema_decay > 0:
    # A float reference without to_float(), whose lambda would not pickle.
    n = ml_collections.FieldReference(0.0) + t.get_ref("num_steps")
    t.ema_decay = n / (n + 5.0)
  return t


def steps_fraction(t, num: int, den: int):
  """``ceil(t.num_steps * num / den)`` (at least 1 for num, num_steps >= 1)
  as a reference: it follows a later ``t.num_steps`` (e.g. a command-line
  override) instead of keeping the value of the default steps. Copies made
  with ``ConfigDict(config)`` share the reference (``deepcopy`` or
  ``copy_and_resolve_references`` do not)."""
  return (t.get_ref("num_steps") * num + den - 1) // den


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "train"          # train | sample | evaluate | pretokenize
  c.task = "tokenizer"      # trainer task, see genvis_jax/train/tasks
  c.seed = 0
  # What fp32 matmuls / convolutions compute in ("" = in training XLA's
  # default: one bf16 pass on TPU, TF32 on recent NVIDIA GPUs; in
  # pre-tokenizing, sampling and evaluation "tensorfloat32", as the official
  # scripts; "float32" | "tensorfloat32" | "bfloat16"); bf16 operands
  # (model.dtype) are unaffected.
  c.matmul_precision = ""
  c.init_from = ""          # convert output, a run or <run>/checkpoints/<step>
  c.init_groups = ()        # groups besides the model init_from's run gives

  c.model = ml_collections.ConfigDict()
  c.model.name = ""
  c.model.dtype = "float32"        # compute dtype ("bfloat16" for mixed precision)
  c.model.param_dtype = "float32"  # master weights
  c.model.remat = "none"           # none | full | dots | dots_no_batch

  c.data = ml_collections.ConfigDict()
  c.data.source = "demo"     # demo | demo_landscapes | image_folder | tfds | tokens
  c.data.name = ""           # tfds name, e.g. imagenet2012
  c.data.path = ""           # image folder / tfds data_dir / token files glob
  c.data.split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 256
  c.data.random_crop = True  # random resized crop (train) vs centre crop
  # Centre crops: adm (center_crop_arr) | torchvision (Resize + CenterCrop) |
  # albumentations (SmallestMaxSize + CenterCrop); "" = adm, or in tokenizer
  # evaluation the protocol's.
  c.data.center_crop = ""
  c.data.random_flip = True
  c.data.image_width = 0     # 0: square; else image_size x image_width (landscapes)
  c.data.crop_min_frac = 1.0  # ADM random crop of 80-100% of the short side: 0.8
  # Random crops: adm (random_crop_arr) | torchvision_bilinear (Resize +
  # RandomCrop, the Equivariant generator's) | albumentations (SmallestMaxSize
  # + RandomCrop, the Equivariant tokenizer's).
  c.data.random_crop_method = "adm"
  # Pre-tokenized crops (source "tokens"): every record is an example of an
  # epoch ("all", 1d-tokenizer's RAR loader), or an epoch visits each image
  # once with one of its crops drawn at random ("one", LlamaGen / FQGAN).
  c.data.crops_per_epoch = "all"
  # Token files: training first checks each file's bytes against the SHA-256
  # in its record (each process hashes 1/N of the files), so a damaged file
  # stops the run before its first step instead of at the step that reads it.
  c.data.verify_checksums = True
  # Image folders: apply EXIF orientation. The official loaders (torchvision
  # pil_loader) and the TFDS path ignore it, so the default does too.
  c.data.exif_transpose = False
  # Image folders: the suffixes listed. "torchvision": ImageFolder's (.jpg .jpeg
  # .png .ppm .bmp .pgm .tif .tiff .webp), as the official loaders; "pil": every
  # format PIL decodes (.gif, .jfif, ...).
  c.data.extensions = "torchvision"
  # Bytes to floats: "torchvision" (ToTensor / Normalize); "taming" (x / 127.5 - 1
  # in float64, the Equivariant tokenizer's ImagePaths; (-1, 1) reads only).
  c.data.to_float = "torchvision"
  c.data.read_threads = 16   # grain reader threads (per worker process)
  c.data.num_workers = 0     # grain worker processes (0 = in-process)
  c.data.prefetch = 2
  c.data.num_classes = 1000

  c.mesh = ml_collections.ConfigDict()
  # -1 takes the remaining devices. Product must equal the device count.
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # TPU multislice: how many slices each axis spans (over the data-centre
  # network); -1 takes the remaining ones (on one slice: 1).
  c.mesh.dcn_shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 256
  c.train.micro_batches = 1      # gradient accumulation steps per update
  c.train.num_steps = 100_000
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3   # multiples of checkpoint_every; + the newest step
  c.train.image_every = 5000     # sample / reconstruction grids
  c.train.ema_decay = 0.0        # 0 = no EMA
  # LitEma's warm-up: update n uses min(ema_decay, (1 + n) / (10 + n)).
  c.train.ema_warmup = False
  c.train.grad_clip = 1.0        # 0 = off
  c.train.check_finite = True    # stop with a clear error on NaN/Inf loss
  c.train.divergence_factor = 100.0  # stop when loss / param norm > this x running median; 0 = off
  # A device's dense bf16 peak TFLOP/s for the log's flops_utilization;
  # None: genvis_jax/core/flops.py's table by device kind (TPUs, A100/H100/H200).
  c.train.peak_tflops = ml_collections.config_dict.placeholder(float)
  # jax.profiler trace of this many steps into workdir/plugins/profile (0 = off),
  # after the run's first profile_skip_steps (compile, warm-up); process 0.
  c.train.profile_steps = 0
  c.train.profile_skip_steps = 5

  # mode=evaluate; kind: generation | reference | tokenizer | demo_fid |
  # class_score.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.kind = "generation"
  c.evaluate.samples = ""        # samples .npz (arr_0 uint8), e.g. from mode=sample
  c.evaluate.reference = ""      # ADM reference .npz (VIRTUAL_imagenet256_labeled.npz)
  c.evaluate.inception = ""      # converted FID Inception (python -m genvis_jax.convert --kind=inception)
  c.evaluate.checkpoint = ""     # tokenizer checkpoint (kind=tokenizer)
  c.evaluate.lpips_path = ""     # LPIPS .npz for tokenizer LPIPS
  c.evaluate.num_images = 50_000 # tokenizer eval / reference images, exactly (0 = whole split)
  c.evaluate.num_samples = 0     # 0 = all samples in the npz
  c.evaluate.num_stored_images = 10_000  # kind=reference: kept as arr_0 (precision / recall)
  c.evaluate.batch_size = 200    # any size: the last batch is padded and masked
  # Inception resize: auto = the reference's recorded one (adm_tf for ADM's
  # reference batches, pytorch_fid with a warning for unknown files); an
  # explicit pytorch_fid | adm_tf that contradicts the reference is refused.
  # kind=tokenizer: auto = the protocol's (adm_tf for all official ones).
  c.evaluate.preprocess = "auto"
  # kind=tokenizer: whose official evaluation to follow ("" = config.model.name's;
  # see genvis_jax.evaluate.protocols.PROTOCOLS).
  c.evaluate.protocol = ""
  c.evaluate.distance_dtype = "float16"   # precision/recall distances, as ADM
  # IS from the samples' logits: "adm" (ADM's evaluator: consecutive 5,000-image
  # splits) or "torch_fidelity" (10 splits of the shuffled set: Equivariant's).
  c.evaluate.inception_score = "adm"
  c.evaluate.dtype = "float32"   # tokenizer compute dtype in kind=tokenizer ("" = config.model.dtype)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"   # constant | cosine
  c.optimizer.warmup_steps = 0
  c.optimizer.end_lr = 0.0
  # Parameter-path regexes excluded from weight decay.
  c.optimizer.no_decay = ("bias", "scale", "embedding")
  return c


# Keys configs add beyond ``get_config``'s defaults, by section: in its
# sections, and the whole of those that ``add_sample`` / ``add_tokenizer`` /
# ``add_pretokenize`` and the tasks' configs make; so that ``finish`` can tell
# a key from a misspelt one (tests/test_config_fields.py holds every shipped
# config's keys to this table).
ADDED_KEYS = {
    "": ("disc", "flow", "latents", "loss", "only", "pretokenize", "sample",
         "stage_order", "stages", "teachers", "tokenizer"),
    "data": ("num_examples",),                    # the demo sources
    "train": ("label_dropout",                    # generators
              "randomness_anneal_start", "randomness_anneal_end"),   # RAR
    "optimizer": ("decay_every", "decay_rate",    # Equivariant step decay
                  "momentum"),                    # sgd
    "evaluate": ("classifier_checkpoint", "min_accuracy",   # demo_fid
                 "num_reference"),
    "sample": ("allow_model_changes", "batch_size", "classes", "dtype",
               "guidance_pow", "guidance_scale", "labels", "latent_scale",
               "num_columns", "num_samples", "num_steps", "seed",
               "temperature", "top_k", "top_p", "wide_columns"),
    "tokenizer": ("checkpoint", "config_file", "dtype", "model", "uint8"),
    "pretokenize": ("batch_size", "data", "device_batch", "output",
                    "overwrite", "split", "ten_crop"),
    "loss": ("adaptive_gan_weight", "disc_loss_weight", "disc_start",
             "disc_weight", "disentangle_weight", "gan", "gan_weight",
             "kl_weight", "learn_logvar", "logvar_init", "lpips_path",
             "perceptual_weight", "quantizer_weight", "reconstruction",
             "reconstruction_weight", "rep_group_size", "rep_weight",
             "semantic_start", "semantic_weight", "stage2", "teacher",
             "teacher_path"),
    "flow": ("diffusion_batch_mul", "shift_group", "shift_num", "t_eps"),
    "latents": ("posterior_noise", "scale"),
}


def known_keys() -> dict[str, set[str]]:
  """Section name ("" = the root) -> the keys configs may set there:
  ``get_config``'s defaults plus ``ADDED_KEYS``."""
  schema = get_config()
  known = {name: set(keys) for name, keys in ADDED_KEYS.items()}
  known[""] |= set(schema.keys())
  for name, section in schema.items():
    if isinstance(section, ml_collections.ConfigDict):
      known.setdefault(name, set()).update(section.keys())
  return known


def model_config(name: str, **fields) -> ml_collections.ConfigDict:
  """``config.model`` of module ``name``: the shared precision / remat keys
  above plus ``fields``, the values that differ from the module class's
  defaults (``genvis_jax.models.config_fields``); ``finish`` adds the
  others at those defaults."""
  m = ml_collections.ConfigDict(get_config().model.to_dict())
  m.name = name
  m.update(fields)
  return m


def add_sample(c, *, batch_size: int, labels: str = "balanced", **sampler):
  """``mode=sample``: ``config.sample`` with the keys every generator's
  sampling run reads, then ``sampler``'s own (guidance, steps, ...).

  ``dtype``: the generator's decode dtype, "float32" (inference produces the
  numbers); "bfloat16" casts the parameters once (logits / latents and the
  sampling stay fp32), "" keeps ``config.model.dtype``. ``labels``: how the
  class of each image is drawn, "balanced" (the same number per class, as
  RAR's and the Equivariant samplers) or "uniform" (i.i.d., as FAR's);
  ``classes``: the classes drawn from (empty: all). The batch starting at
  image i draws with ``fold_in(key(seed), i)``. ``allow_model_changes``:
  ``config.model`` keys (comma-separated) sampled with other values than the
  run trained with, on purpose, and ``tokenizer.checkpoint`` to decode with
  other tokenizer weights than its tokens came from; others are refused
  (``genvis_jax.sample.parts``: ``check_trained_with``,
  ``check_tokenizer_origin``)."""
  s = c.sample = ml_collections.ConfigDict()
  s.update(sampler)
  s.dtype = "float32"
  s.num_samples = 50_000
  s.batch_size = batch_size
  s.seed = 0
  s.labels = labels
  s.classes = ()
  s.allow_model_changes = ""
  return s


def add_tokenizer(c, model_config, checkpoint="", config_file=""):
  """The tokenizer a generator pre-tokenizes and decodes with:
  ``config.tokenizer.{model, checkpoint, dtype, uint8, config_file}``. Its
  pixel range is the model's own (``genvis_jax.models.value_range``), never
  restated here.

  ``dtype``: compute dtype of the tokenizer when it produces data (pretokenize,
  sample decode), replacing ``model.dtype`` there; "float32" (default) matches
  the official models, "" keeps ``model.dtype``. ``uint8``: how sampled images
  become bytes, "" = the tokenizer's official sampler (maskgit_vqgan:
  "truncate", llamagen_vq / fqgan: "llamagen", eq_tokenizer: "round"; see
  ``genvis_jax.core.pixels.to_uint8``). ``config_file``: the config that
  trains and evaluates this tokenizer (``configs/X.py[:arg]``), which
  messages name; it decides nothing."""
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.model = model_config
  c.tokenizer.checkpoint = checkpoint   # convert output, a run or <run>/checkpoints/<step>
  c.tokenizer.dtype = "float32"         # pretokenize / decode compute dtype
  c.tokenizer.uint8 = ""                # "" = official: truncate|llamagen|round
  c.tokenizer.config_file = config_file  # its own config, for messages
  return c


def add_pretokenize(c, image_data, *, ten_crop=True, batch_size=256):
  """``mode=pretokenize``: encode ``config.pretokenize.data`` (an image data
  config) with ``config.tokenizer`` into token files at ``output``."""
  p = c.pretokenize = ml_collections.ConfigDict()
  p.data = image_data
  # Centre crops (ten_crop: their flips too), never training augmentations.
  p.data.random_crop = p.data.random_flip = False
  p.split = "train"
  p.output = ""          # default: <workdir>/tokens/<split>
  p.ten_crop = ten_crop  # 1.1x centre crop -> 5 crops + flips (official recipe)
  p.batch_size = batch_size   # images read per process and step
  # Images (crops, with ten_crop) each device encodes per call: bounds the
  # encoder's activation memory (RAR's official script: 8 x 10 per GPU).
  p.device_batch = 32
  p.overwrite = False    # replace an output written with other settings
  return c


def finish(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The last step of every runnable ``get_config``: adds to each model
  section the settings it leaves out, at their defaults
  (``genvis_jax.models.config_defaults``: the module class's), so that each
  can be set on the command line (``--config.model.dropout=0.0``) while a
  config file states only what differs; then locks the whole config, every
  nested section included, as ``--config`` does: a misspelt key set in
  Python raises (``with c.unlocked():`` adds a key of one's own). Returns
  ``c``."""
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

  def visit(node):
    for key, value in node.items():
      if not isinstance(value, ml_collections.ConfigDict):
        continue
      if key in MODEL_SECTIONS and isinstance(value.get("name"), str):
        try:
          missing = {k: v for k, v in models.config_defaults(value.name).items()
                     if k not in value}
        except ConfigError:   # not a buildable model (e.g. a teacher's name)
          missing = {}
        with value.unlocked():
          value.update(missing)
      visit(value)
    # ml_collections' lock() skips what is locked already, with its children.
    node.lock()

  from genvis_jax.core import settings  # pylint: disable=import-outside-toplevel
  misspelt = settings.misspelt_keys(c, known_keys(), skip=MODEL_SECTIONS)
  if misspelt:
    raise ConfigError(
        f"Config key(s) {', '.join(misspelt)} look misspelt: nothing reads "
        "them, so the setting would be ignored. Fix the name in the config "
        "file (a key of your own that only resembles one: add it after "
        "finish(), in `with config.unlocked():`).")
  visit(c)
  return c
