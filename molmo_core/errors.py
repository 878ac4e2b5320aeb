"""User-facing error types. Messages say what was found, what was expected and what to do."""


class MolmoInputError(ValueError):
    """Bad user input: an unreadable or huge image, an empty or too long prompt."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or loaded."""


class ModelUnloadedError(RuntimeError):
    """The model was unloaded (or replaced) before or while a request was served."""
