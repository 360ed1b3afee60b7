"""Errors raised for bad input: each names the problem in words a user can act on."""


class SenseError(ValueError):
    """Base class for every user-facing error of the decoding package."""


class InvalidRequestError(SenseError):
    """A request (prompt, sampling parameters, method) is malformed or out of range; `param`,
    where known, names the request's field at fault (an API's 400 reports it)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit the model's context window."""


class ModelLoadError(SenseError):
    """The target model could not be found or loaded."""


def task_cause(exc: BaseException) -> BaseException:
    """The error a remote task raised, where `exc` wraps it (a Ray ``RayTaskError`` is also an
    instance of its cause's class, and its text is the task's whole traceback); else `exc`."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError") else exc


def one_line(exc: BaseException) -> str:
    """An expected error's message as one line (a remote task's own, whitespace folded)."""
    return " ".join(str(task_cause(exc)).split())


def run_command(body, errors: tuple[type[BaseException], ...], *, prefix: str, interrupted: str) -> int:
    """A command line's outer frame: `body()`'s exit code; an expected error (one of `errors`) is
    one line on stderr (`prefix` + the message, whitespace folded) and exit 2, never a traceback;
    Ctrl-C is `interrupted` and exit 130."""
    import sys

    try:
        return body()
    except errors as exc:
        print(f"{prefix}{one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
