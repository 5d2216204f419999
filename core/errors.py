"""The one error class a user is meant to see without a traceback.

``InputError`` is bad input a user can fix: a missing or malformed file, a flag or config value
out of range, a checkpoint that does not fit. Its message says what to change. The CLI prints it
and exits 2; any other exception is a bug (or an environment failure) and shows its traceback.
It is a ValueError, so code that catches ValueError keeps working.
"""


class InputError(ValueError):
    """Bad input; the message says what to change."""
