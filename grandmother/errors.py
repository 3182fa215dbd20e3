"""User-facing errors. The command line prints them as one line (`grandmother: error: ...`), no traceback."""


class GrandmotherError(Exception):
    """Bad input from the user: a flag, a file, a folder, a checkpoint. The message names it."""


class ConfigError(GrandmotherError, ValueError):
    """A setting that cannot be used; the message names it."""
