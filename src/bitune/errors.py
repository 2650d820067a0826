"""Exceptions raised by bitune. The CLI turns a `BituneInputError` into a clear message and exit code 2."""


class BituneError(Exception):
    """Base class of every error bitune raises on purpose."""


class BituneInputError(BituneError, ValueError):
    """Bad user input (a file, a row, a field, a setting); the message says where and what to do."""
