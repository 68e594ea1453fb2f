"""The ablation tool's user-facing error (a leaf module: every other module of the package may import it)."""


class AblationError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 2."""
