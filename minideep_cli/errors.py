"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix: bad file, unknown key, impossible option."""
