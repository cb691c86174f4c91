"""The one error type the CLI turns into a single line and a non-zero exit."""


class Lav2Error(Exception):
    """Bad input or a failed precondition, with a message that says what, where and how to fix it."""
