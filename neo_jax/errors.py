"""User-facing errors: the CLI prints their message (one clear line) and exits 2."""


class UserError(Exception):
    """Bad input from the user: the message names the file, record or setting and the problem."""
