"""Errors a user can fix: each carries a message that says what is wrong and what to do.

Entry points catch `UserError` and print only its message (no traceback), so raise it, or a subclass,
whenever bad input rather than a bug stopped the run.
"""


class UserError(Exception):
  """Bad input (configuration, mesh, data, model directory) that the user can fix."""


class ConfigError(UserError):
  """A gin file or binding is wrong: unknown name, unset macro, bad value."""


class MeshError(UserError):
  """The requested device mesh does not fit the devices JAX sees."""


class DataError(UserError):
  """A dataset, vocabulary or corpus is missing or unreadable."""


class CheckpointMismatchError(UserError):
  """MODEL_DIR holds a checkpoint written by a different configuration."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


class CheckpointDamagedError(UserError):
  """No checkpoint step in MODEL_DIR can be restored intact (or its signature.json is unreadable)."""


class ModelDirLockedError(UserError):
  """Another trainer holds MODEL_DIR's lock."""


class DiskFullError(UserError):
  """A write failed because the disk (or quota) is full: RESOURCE_EXHAUSTED / ENOSPC."""
