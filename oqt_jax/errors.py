"""Exceptions with one-line messages that name the offending field or file."""


class ConfigError(ValueError):
  """A config value is invalid; the message starts with the field name."""


class DataError(ValueError):
  """A data file or dataset cannot be read; the message names it."""


class CheckpointError(RuntimeError):
  """A checkpoint (or HF checkpoint dir) is missing, corrupt or does not match the model."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or state; the message names the step."""
