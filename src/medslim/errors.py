"""User-facing errors: the CLI prints ``str(error)`` on one line and exits with code 2."""


class MedslimError(Exception):
    """A problem with the user's input (paths, options, model files), not a bug in medslim."""
