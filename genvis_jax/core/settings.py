"""Recorded settings: the flat JSON records that guard a resume.

A checkpoint's config, a sample folder's ``settings.json`` and a token file's
``<file>.json`` each record what decided their contents. Before reusing them,
a run compares its own settings with the record; :func:`differences` names
what changed in one format for all three.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping


def flatten(d: Mapping, prefix: str = "") -> dict:
  """Nested dicts -> one dict keyed ``"a.b.c"`` (hparams, settings records)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(old: Mapping | None, new: Mapping | None, *,
                ignore: Iterable[str] = (),
                names: tuple[str, str] | None = None) -> list[str]:
  """The flattened keys whose values differ, sorted, one line each.

  Args:
    old, new: nested or flat dicts (None = empty).
    ignore: flattened keys (``"a.b"``) or their prefixes (``"a"``) to skip.
    names: ``(old_name, new_name)`` for lines ``"key: old_name X vs new_name
      Y"``; by default ``"key: X -> Y"``. A key absent on one side shows
      ``(absent)``; absent and None compare equal (records from before a
      setting existed still match a config that leaves it unset).
  """
  a, b = flatten(old or {}), flatten(new or {})
  skip = tuple(ignore)
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                and not any(k == s or k.startswith(s + ".") for s in skip))
  if not keys and a == b and (old or {}) != (new or {}):
    # Records that differ only in an empty section vs none ({} vs missing).
    keys = sorted(k for k in set(old or {}) | set(new or {})
                  if (old or {}).get(k) != (new or {}).get(k)
                  and not any(k == s or k.startswith(s + ".") for s in skip))
    a, b = dict(old or {}), dict(new or {})
  def show(d, k):
    return repr(d[k]) if k in d else "(absent)"
  if names:
    return [f"{k}: {names[0]} {show(a, k)} vs {names[1]} {show(b, k)}"
            for k in keys]
  return [f"{k}: {show(a, k)} -> {show(b, k)}" for k in keys]


def shorten(lines: list[str], limit: int, sep: str = ", ") -> str:
  """``lines`` joined by ``sep``, the first ``limit`` and then "N more"."""
  shown = sep.join(lines[:limit])
  more = len(lines) - limit
  return shown + (f"{sep}... {more} more" if more > 0 else "")


def get(tree: Any, dotted: str) -> Any:
  """``tree["a"]["b"]`` for ``"a.b"``; None where a level is missing."""
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, Mapping) else None
  return tree


def unknown_keys(config, known: Mapping[str, set], skip=()) -> list[tuple]:
  """``(dotted path, section name)`` of each key of a section of ``config``
  (a ConfigDict, at any depth) named in ``known`` (section name -> its keys;
  "" = the root) that is not one of its keys. The sections under ``stages``
  are roots (a demo's whole configs); those named in ``skip`` are not
  read."""
  found = []

  def visit(node, path, name):
    if name in known:
      found.extend((f"{path}{key}", name)
                   for key in sorted(set(node.keys()) - set(known[name])))
    for key, value in node.items():
      if hasattr(value, "keys") and not isinstance(value, dict) and (
          key not in skip):
        visit(value, f"{path}{key}.", "" if name == "stages" else key)

  visit(config, "", "")
  return found


def misspelt_keys(config, known: Mapping[str, set], skip=()) -> list[str]:
  """``path.key (did you mean X?)`` for each of ``unknown_keys`` close to a
  key of its section (difflib ratio >= 0.8): ``train.ema_decy`` beside
  ``train.ema_decay``."""
  found = []
  for path, name in unknown_keys(config, known, skip):
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1],
                                      sorted(known[name]), n=1, cutoff=0.8)
    if close:
      found.append(f"{path} (did you mean {close[0]}?)")
  return found
