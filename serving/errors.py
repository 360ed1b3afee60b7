"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with a status.

Every failure a client can see goes through :class:`APIError`, so no traceback ever reaches a
client; unexpected exceptions become a 500 with a generic message (the traceback is logged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None       # seconds, for 429/503

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "APIError":
        return cls(**d)


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_sense_error(exc: Exception, param: str | None = None) -> APIError:
    """A decoding-package error (bad prompt, parameters, method) as a 400."""
    from decoding.errors import ContextLengthError

    param = getattr(exc, "param", None) or param
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), "invalid_request_error", param, "context_length_exceeded")
    return invalid(str(exc), param)


def from_validation_error(exc) -> APIError:
    """The first problem of a pydantic ValidationError, naming the parameter (dotted path)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return invalid("invalid request body", None)
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    # Union members add their type name to the path ("stop.str"); keep the field path only.
    loc = [p for p in loc if p not in {"str", "int", "float", "bool", "list", "dict", "list[str]", "list[int]",
                                        "list[list[int]]", "function-after", "literal['adaptive']"}
           and not p.startswith(("list[", "function-", "literal["))]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {err.get('msg')}",
                        "invalid_request_error", None, "invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", "invalid_request_error", param,
                        "unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: {param}", "invalid_request_error", param,
                        "missing_required_parameter")
    if kind == "model_type" and not loc:
        return APIError(400, "The request body must be a JSON object", "invalid_request_error", None, "invalid_json")
    msg = err.get("msg", "invalid value")
    return invalid(f"Invalid value for {param}: {msg}" if param else msg, param)


def overloaded(status: int, retry_after: int, what: str = "the server") -> APIError:
    return APIError(status, f"{what} is overloaded: retry after {retry_after} s", "server_overloaded" if status == 503
                    else "rate_limit_exceeded", None, "overloaded", retry_after)


def internal(message: str = "internal server error") -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")
