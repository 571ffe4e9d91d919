"""The one exception type for bad user input: the CLI prints its message, not a traceback."""


class UsageError(ValueError):
    """Bad input (config key, path, option value) found before any work; the message names the fix."""
