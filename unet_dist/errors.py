"""The one error type users see: a clear one-line message, never a traceback."""


class UnetDistError(Exception):
    """Bad input or a refused operation; the message names the file or key and what was expected."""
