"""Errors a user can act on. Adapters show their message as it is."""


class InputError(ValueError):
    """Frames, masks or arguments that cannot be used; the message names the problem."""


class CheckpointError(RuntimeError):
    """A weights file or URL that cannot be loaded into the requested model."""
