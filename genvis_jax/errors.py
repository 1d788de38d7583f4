"""The one exception type for user errors (bad flags, config, data, checkpoints).

``python -m genvis_jax.main`` prints a ``UserError`` as one message without a
traceback and exits non-zero; anything else is a bug and keeps its traceback.
Library errors that a user causes and can fix subclass it (often together with
the builtin type callers already catch, e.g. ``class X(UserError, ValueError)``).
"""


class UserError(Exception):
  """An error the user can fix; its message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value or command-line argument that cannot work as given (e.g. a
  batch that does not split across the devices, a missing ``--src``); the
  message names the field and a working value."""


class OutputExistsError(UserError, FileExistsError):
  """An output path already holds data that would be replaced."""
