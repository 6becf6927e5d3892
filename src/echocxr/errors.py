"""User-facing errors: the CLI prints these as one line and exits 2, never with a traceback."""


class UserError(Exception):
    """A mistake in the user's input (bad path, malformed file, wrong checkpoint)."""
