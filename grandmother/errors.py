"""User-facing errors. The command line prints them as one line (`grandmother: error: ...`), no traceback,
and exits with the error's `exit_code`."""


class GrandmotherError(Exception):
    """Bad input from the user: a flag, a file, a folder, a checkpoint. The message names it."""

    exit_code = 2


class ConfigError(GrandmotherError, ValueError):
    """A setting that cannot be used; the message names it."""


class JobFailed(GrandmotherError):
    """A part of a running job was lost: a worker process or a Ray actor killed, a node gone. Not bad input
    (exit status 1); the message says where the run can continue from."""

    exit_code = 1
