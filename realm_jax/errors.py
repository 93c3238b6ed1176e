"""User-facing errors: the CLI prints these without a traceback.

Modules subclass `RealmError` for their own failure kinds (bad data, bad config,
storage conflicts) so messages can say which file, record or value was wrong.
"""


class RealmError(Exception):
  """An error caused by the user's input or environment, with a clear message."""


class ConfigError(RealmError, ValueError):
  """A configuration value is invalid."""
