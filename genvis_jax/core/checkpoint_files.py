"""Which steps a run's ``checkpoints/`` holds, what a committed
``checkpoints/<step>/`` holds on disk, and the cheap checks run on it before
Orbax reads it (a truncated TensorStore file can otherwise abort the process
inside a parallel restore).

``state/`` (an OCDBT database), ``config/`` (JSON), and ``data/``: one
``process_<i>-of-<n>.json`` per process, the file name Grain's checkpoint
handler writes for process i of n (:func:`data_file`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from genvis_jax.core import files
from genvis_jax.core import multihost


def absolute(directory: str) -> epath.Path:
  """``directory`` as an absolute path (a ``gs://`` URL as it is): Orbax
  refuses relative paths."""
  path = epath.Path(directory)
  return path if files.is_remote(directory) else path.absolute()


def _saved_with_ocdbt(state_dir: epath.Path) -> bool:
  """Whether Orbax's ``_METADATA`` says the arrays were written to OCDBT
  (False where it cannot tell)."""
  try:
    return bool(json.loads((state_dir / "_METADATA").read_text())
                .get("use_ocdbt"))
  except (OSError, ValueError, AttributeError):
    return False


# The arrays a weight load reads (``core.run_weights``): every parameter
# group and the EMA, not the optimizer state (about half a step's arrays).
WEIGHTS = ("params.", "ema.")


def check_ocdbt(state_dir: epath.Path, share: tuple[int, int] = (0, 1),
                prefixes: tuple[str, ...] = ()) -> None:
  """Reads the last byte of every value of the OCDBT database in
  ``state_dir`` (a step's ``state/``, a parameter checkpoint's ``params/``):
  a truncated data file or a damaged manifest / b-tree node raises
  ValueError here, naming it, cheaply, instead of inside Orbax's parallel
  restore.

  ``share``: ``(i, n)`` reads every n-th value from the i-th: the n
  processes of a job that agree on the outcome (``step_walk``) split the
  reads (one per array shard, so millions on a pod) instead of each making
  all of them. ``prefixes``: only the values under these key prefixes (e.g.
  ``WEIGHTS``), all of them where empty."""
  name = state_dir.name
  if not (state_dir / "manifest.ocdbt").exists():
    if list(state_dir.glob("ocdbt.process_*")) or _saved_with_ocdbt(state_dir):
      raise ValueError(f"{name}/manifest.ocdbt is missing")
    return  # not an OCDBT checkpoint
  kv = ts.KvStore.open({"driver": "ocdbt",
                        "base": files.kvstore_url(state_dir)}).result()
  keys = kv.list().result()
  if prefixes:
    under = tuple(p.encode() for p in prefixes)
    keys = [k for k in keys if k.startswith(under)]
  if not keys:
    raise ValueError(f"{name}/ holds no arrays"
                     + (f" under {', '.join(prefixes)}" if prefixes else ""))
  index, count = share
  reads = [(k, kv.read(k, byte_range=slice(-1, None)))
           for k in keys[index::count]]
  for key, read in reads:
    try:
      result = read.result()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{name}/{key.decode()} is unreadable ({str(e).strip()[:300]})") from e
    if result.state != "value":
      raise ValueError(f"{name}/{key.decode()} is missing")
    if len(result.value) != 1:
      # A value whose data file is gone reads as empty bytes, not an error.
      raise ValueError(f"{name}/{key.decode()} is empty (its data file under "
                       f"{name}/ is missing)")


def validate_step(step_dir: epath.Path, with_data: bool = True,
                  share: tuple[int, int] = (0, 1),
                  weights_only: bool = False) -> None:
  """Cheap checks that ``checkpoints/<step>`` can be read, before reading it.

  Raises ValueError (or the underlying JSON / TensorStore error) naming the
  first damaged file: missing ``state/`` or ``state/_METADATA``, an item
  ``_CHECKPOINT_METADATA`` lists missing (``config/``, and with ``with_data``
  ``data/``), unparsable
  JSON metadata (``state/_METADATA``, ``state/_sharding``,
  ``_CHECKPOINT_METADATA``) or data-iterator state, truncated or missing
  OCDBT files (this process's ``share`` of them: ``check_ocdbt``; with
  ``weights_only`` those of the ``WEIGHTS`` a weight load reads, so that a
  step whose optimizer state alone is damaged still gives its weights).
  """
  state = step_dir / "state"
  if not state.exists():
    raise ValueError("state/ is missing")
  if not (state / "_METADATA").exists():
    raise ValueError("state/_METADATA is missing")
  for meta in (state / "_METADATA", state / "_sharding",
               step_dir / "_CHECKPOINT_METADATA"):
    if meta.exists():   # _sharding and the step's metadata are optional
      try:
        json.loads(meta.read_text())
      except ValueError as e:
        raise ValueError(f"{meta.relative_to(step_dir)} is not valid JSON "
                         f"({e})") from e
  # The items the step was saved with: one gone (a copy that stopped, a
  # deleted folder) resumed as if never saved (no config check, the data
  # order drawn afresh) while an older step had them.
  items = _saved_items(step_dir)
  for item in sorted(items - ({"state"} if with_data else {"state", "data",
                                                            "config"})):
    if not (step_dir / item).exists():
      raise ValueError(f"{item}/ is missing (_CHECKPOINT_METADATA lists it)")
  for item in ("config", "data"):
    if item == "data" and not with_data:
      continue
    for f in sorted((step_dir / item).glob("*.json")) + sorted(
        (step_dir / item).glob("metadata")):
      try:
        json.loads(f.read_text())
      except ValueError as e:
        raise ValueError(f"{item}/{f.name} is not valid JSON ({e})") from e
  if with_data:
    saved_process_count(step_dir)
  check_ocdbt(state, share, WEIGHTS if weights_only else ())


def _saved_items(step_dir: epath.Path) -> set[str]:
  """The items Orbax saved in ``step_dir`` (``_CHECKPOINT_METADATA``'s
  ``item_handlers``); empty where it is absent or names none."""
  meta = step_dir / "_CHECKPOINT_METADATA"
  if not meta.exists():
    return set()
  handlers = json.loads(meta.read_text()).get("item_handlers")
  return set(handlers) if isinstance(handlers, dict) else set()


def saved_config(step_dir: epath.Path) -> dict | None:
  """The run config saved with ``checkpoints/<step>`` (``config/``), read
  directly (Orbax's restore ends in a wait for every process); None where
  none was saved."""
  path = step_dir / "config"
  if not path.exists():
    return None
  return json.loads((path / "metadata").read_text())


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def data_file(step_dir: epath.Path, index: int, count: int) -> epath.Path:
  """Process ``index`` of ``count``'s saved input position in ``step_dir``."""
  return step_dir / "data" / f"process_{index}-of-{count}.json"


def saved_process_count(step_dir: epath.Path) -> int | None:
  """How many processes saved the input position of ``step_dir``: the ``n``
  of its ``data/process_<i>-of-<n>.json`` files (None without ``data/``).

  Raises:
    ValueError: ``data/`` holds no such file, files of two counts, or not
      one per process (a file is missing).
  """
  data = step_dir / "data"
  if not data.exists():
    return None
  found: dict[int, set[int]] = {}
  for f in data.glob("process_*.json"):
    m = _DATA_FILE.fullmatch(f.name)
    if m:
      found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
  if len(found) != 1:
    raise ValueError(f"data/ holds {'no' if not found else 'mixed'} "
                     "process_<i>-of-<n>.json iterator states")
  (count, indices), = found.items()
  missing = sorted(set(range(count)) - indices)
  if missing:
    name = data_file(step_dir, missing[0], count).name
    raise ValueError(f"data/{name} is missing")
  return count


def saved_steps(folder: epath.Path) -> set[int]:
  """The finalized steps under a run's ``checkpoints/``, named as Orbax's
  CheckpointManager names and lists them (``ocp.step.checkpoint_steps``
  also reads ``old_6`` or ``006`` as step 6)."""
  return {m.step for m in ocp.step.standard_name_format().find_all(folder)}


class StepsOfProcess0:
  """Orbax's standard step names (``checkpoints/<step>``), the steps listed
  by process 0 alone, for every process (``multihost.ints_on_process_0``).

  An ``ocp.CheckpointManager`` lists its steps on every process when it is
  built, between two waits for all of them: a process whose listing failed
  raised alone while the others waited (until Orbax's barrier timed out),
  and one whose listing lagged kept other steps than the rest. Orbax's own
  ``single_host_load_and_broadcast`` raises a listing that failed on process
  0 there alone. Every process calls ``find_all`` together (the manager does,
  when it is built). Each process still reads the listed steps' commit
  times and (absent) metrics files on its own, as Orbax does.
  """

  def __init__(self):
    self._standard = ocp.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_step(self, base_path, step: int):
    return self._standard.find_step(base_path, step)

  def find_all(self, base_path):
    base = epath.Path(base_path)
    steps = multihost.ints_on_process_0(lambda: sorted(saved_steps(base)))
    return [ocp.step.Metadata(step=s, path=base / self.build_name(s))
            for s in steps]


# --- input positions (data/process_<i>-of-<n>.json) ----------------------------

class IteratorSnapshot:
  """Freezes a Grain iterator's state now: an async save may run after the loop
  has already pulled the next batch. With ``seed``, the file also records the
  data seed the order was drawn with (``{"data_seed", "iterator"}``), with
  ``group`` the process's data group ``[group, count]``
  (``sharding.data_groups``: which shard of the data it read), and with
  ``listing`` the data's listing (``PipelineInfo.listing``: an image
  folder's, a TFDS split's)."""

  def __init__(self, it, seed=None, group=None, listing=None):
    state = it.get_state()
    if seed is not None:
      state = {"data_seed": int(seed), "iterator": state}
      if group is not None:
        state["data_group"] = [int(g) for g in group]
      if listing is not None:
        state["data_listing"] = listing
    self._state = json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


@dataclasses.dataclass(frozen=True)
class SavedPosition:
  """An input position saved with a step: this process's Grain iterator
  ``state``, the data ``seed`` its order was drawn with (None: not recorded,
  i.e. ``config.seed``), or ``why`` it cannot be used here (state None);
  ``listing``: the data's listing it counts in (an image folder's, a TFDS
  split's), where recorded (also when ``why`` is set, from process 0's
  file)."""
  state: Any = None
  seed: int | None = None
  why: str | None = None
  listing: dict | None = None


def saved_position(step_dir: epath.Path, process_index: int,
                   process_count: int,
                   data_group: tuple[int, int] | None = None) -> SavedPosition:
  """Process ``process_index``'s (of ``process_count``) input position saved
  in ``step_dir``, read directly (no
  Orbax barrier: a process whose position does not fit must not leave the
  others waiting in one).

  The Grain state is per process (``data/process_<i>-of-<n>.json``); a step
  written by another number of processes (a job resumed on a bigger or
  smaller slice: the shards are cut differently), or one without ``data/``,
  has none for this one, and ``why`` says so. So has one read as another
  data group than ``data_group``, this run's (another mesh at the same
  process count can group the processes otherwise: another shard of the
  data, and processes of one group must hold one position); positions
  saved before groups were recorded were read as group = process.

  Raises:
    OSError: the file cannot be read (storage; not a reason to change the
      data order).
    ValueError: its JSON is damaged, or ``data/`` lacks a process's file
      or mixes process counts (``restore_latest(with_data=True)`` checks
      the files before this reads them).
  """
  count = saved_process_count(step_dir)
  if count is None:
    return SavedPosition(why="was not saved")
  read = lambda i: json.loads(data_file(step_dir, i, count).read_text())
  if count != process_count:
    try:   # the listing alone, of any process (one folder)
      listing = _recorded(read(0)).get("data_listing")
    except (OSError, ValueError):
      listing = None
    return SavedPosition(why=f"was written by {count} process(es) and this "
                         f"job has {process_count}", listing=listing)
  saved = read(process_index)
  recorded = _recorded(saved)
  group = tuple(recorded.get("data_group", ())) or (process_index, count)
  listing = recorded.get("data_listing")
  if data_group is not None and group != tuple(data_group):
    return SavedPosition(why=f"was read as data group {group[0]} of "
                         f"{group[1]}, and this run's mesh makes this process "
                         f"group {data_group[0]} of {data_group[1]}",
                         listing=listing)
  if recorded:
    return SavedPosition(saved["iterator"], int(saved["data_seed"]),
                         listing=listing)
  return SavedPosition(saved)   # written before the seed was recorded


def _recorded(saved) -> dict:
  """A position file's records beside the Grain state (``IteratorSnapshot``:
  ``data_seed``, ``iterator`` and, where saved, ``data_group`` /
  ``data_listing``); {} for a file of the Grain state alone (written before
  the seed was recorded)."""
  keys = {"data_seed", "iterator", "data_group", "data_listing"}
  if isinstance(saved, dict) and {"data_seed", "iterator"} <= set(saved) <= keys:
    return saved
  return {}
