"""Errors meant for the person at the keyboard: the CLI prints them without a traceback."""


class UserError(Exception):
  """Bad input (config, data, paths). The message names the key or file and the fix."""


class ConfigError(UserError, ValueError):
  """A config problem, with the offending key in the message."""
