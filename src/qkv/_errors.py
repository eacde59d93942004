"""The warning class qkv's own warnings use (the test suite turns them into errors)."""


class QkvWarning(UserWarning):
    """A warning raised by qkv itself."""
