"""Errors raised for bad input: each names the problem in words a user can act on."""


class SenseError(ValueError):
    """Base class for every user-facing error of the decoding package."""


class InvalidRequestError(SenseError):
    """A request (prompt, sampling parameters, method) is malformed or out of range."""


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit the model's context window."""


class ModelLoadError(SenseError):
    """The target model could not be found or loaded."""
