"""Errors raised by tome_fx."""


class UnsupportedModelError(ValueError):
    """The model cannot be transformed safely; the message names the block and the reason."""
