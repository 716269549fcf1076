"""The exception shared by both fast-path implementations, so callers catch one class."""


class EnvelopeError(ValueError):
    """A frame that is not a well-formed envelope. ``str(exc)`` is the reason."""
