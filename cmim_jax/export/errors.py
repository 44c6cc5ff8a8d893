"""The packer's error, in a module of its own so every architecture's walker can raise it."""


class NotExportableError(ValueError):
  """The model cannot be packed; the message names it and says why."""
