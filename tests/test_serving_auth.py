"""API keys, request limits and hostile request bodies, without Ray: serving/auth.py (key
loading, constant-time checks, the ASGI middleware driven with real ASGI messages),
protocol.read_body / parse and the OpenAPI document. The same paths over real HTTP against a
running Serve application: tests/test_serving_security.py."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from openapi_spec_validator import validate as validate_openapi   # a declared test dependency

from serving import auth, protocol
from serving.auth import APIKeyMiddleware, APIKeys, AuthConfigError, load_api_keys
from serving.config import ServingConfig
from serving.errors import APIError

KEY_A, KEY_B = "sk-test-aaaaaaaaaaaaaaaaaaaa", "sk-test-bbbbbbbbbbbbbbbbbbbb"


# -- loading keys ------------------------------------------------------------------------------


def test_no_source_means_no_authentication():
    assert load_api_keys(None, None) is None


def test_key_file_and_environment(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# our keys\n\n{KEY_A}   # the first\n  {KEY_B}\n#{KEY_B}x\n")
    keys = load_api_keys(str(f), None)
    assert len(keys) == 2 and keys.check(KEY_A) and keys.check(KEY_B) and not keys.check(KEY_B + "x")
    both = load_api_keys(str(f), "MY_KEYS", environ={"MY_KEYS": " k1 ,, k2 ,"})
    assert len(both) == 4 and both.check("k1") and both.check("k2") and both.check(KEY_A)
    env_only = load_api_keys(None, "MY_KEYS", environ={"MY_KEYS": "k1"})
    assert env_only.check("k1") and not env_only.check(KEY_A)


@pytest.mark.parametrize("content,what", [(None, "does not exist"), ("", "holds no API key"),
                                          ("# only a comment\n\n   \n", "holds no API key"),
                                          (f"{KEY_A}\nsk bad key\n", "key #2 has spaces")])
def test_unusable_key_file_is_a_startup_error(tmp_path, content, what):
    f = tmp_path / "keys"
    if content is not None:
        f.write_text(content)
    with pytest.raises(AuthConfigError, match=what) as err:
        load_api_keys(str(f), None)
    assert str(f) in str(err.value) and KEY_A not in str(err.value) and "bad" not in str(err.value)


@pytest.mark.parametrize("environ,what", [({}, "is not set"), ({"K": ""}, "holds no API key"),
                                          ({"K": " , ,"}, "holds no API key"), ({"K": "ok,sk\u00e9"}, "key #2")])
def test_unusable_key_variable_is_a_startup_error(environ, what):
    with pytest.raises(AuthConfigError, match=what) as err:
        load_api_keys(None, "K", environ=environ)
    assert "K" in str(err.value) and "ok" not in str(err.value) and "sk\u00e9" not in str(err.value)


def test_config_fields():
    ing = ServingConfig.model_validate({"ingress": {"api_keys_env": "SENSE_API_KEYS"}}).ingress
    assert ing.auth_enabled and ing.max_body_bytes == 1 << 20
    assert not ServingConfig().ingress.auth_enabled
    for bad in ({"api_keys_file": ""}, {"api_keys_env": "not a name"}, {"max_body_bytes": 0}):
        with pytest.raises(ValueError):
            ServingConfig.model_validate({"ingress": bad})
    with pytest.raises(ValueError, match="exceeds sampling.max_tokens_limit"):
        ServingConfig.model_validate({"sampling": {"max_tokens_limit": 8}})     # completion default 16


# -- checking keys -----------------------------------------------------------------------------


def test_check_accepts_exactly_the_keys():
    keys = APIKeys([KEY_A, KEY_B])
    assert keys.check(KEY_A) and keys.check(KEY_B.encode())
    for wrong in (None, "", KEY_A[:-1], KEY_A + "a", KEY_A.upper(), " " + KEY_A, "x"):
        assert not keys.check(wrong), wrong
    assert KEY_A not in repr(keys) and KEY_A not in str(vars(keys))


def test_check_compares_with_every_key_whatever_matches(monkeypatch):
    """No early exit: each check makes one comparison per key, of equal-length digests, whether
    the key is missing, wrong, or matches the first or the last key."""
    import hmac

    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    keys = APIKeys([f"key-{i}" for i in range(5)])
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in ("key-0", "key-4", "nope", "", None, "key-0" * 100):
        calls.clear()
        keys.check(presented)
        assert calls == [(32, 32)] * 5, presented


@pytest.mark.parametrize("values,ok", [
    ([b"Bearer " + KEY_A.encode()], True), ([b"bearer " + KEY_A.encode()], True),
    ([b"  BEARER   " + KEY_A.encode() + b"  "], True), ([b"Basic " + KEY_A.encode()], False),
    ([KEY_A.encode()], False), ([b"Bearer"], False), ([b"Bearer "], False), ([b"Bearer" + KEY_A.encode()], False),
    ([b"Bearer " + KEY_A.encode()] * 2, False), ([], False), ([b"Bearer \xff\xfe"], False)])
def test_authorization_header(values, ok):
    assert APIKeys([KEY_A]).check_authorization(values) is ok


# -- the middleware, with real ASGI messages -----------------------------------------------------


class _Inner:
    """The application behind the middleware: answers 200 and records what reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send):
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(mw, path: str, headers=(), root_path: str = "") -> tuple[int, dict, bytes]:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path,
             "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, \
        b"".join(m.get("body", b"") for m in sent[1:])


def test_middleware_refuses_without_a_valid_key():
    inner = _Inner()
    keys = APIKeys([KEY_A])
    mw = APIKeyMiddleware(inner, lambda: keys)
    refused = []
    for headers in ([], [("Authorization", "Bearer wrong")], [("Authorization", f"Basic {KEY_A}")],
                    [("Authorization", f"Bearer {KEY_A}x")], [("X-API-Key", KEY_A)]):
        for path in ("/v1/completions", "/v1/models", "/openapi.json", "/no/such/route", "/health/"):
            status, headers_out, body = _call(mw, path, headers)
            assert status == 401 and headers_out["www-authenticate"] == "Bearer"
            assert headers_out["content-type"] == "application/json"
            refused.append(body)
    assert inner.paths == []                       # nothing reached the application
    assert len(set(refused)) == 1                  # one answer: it does not say what was wrong
    err = json.loads(refused[0])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"

    assert _call(mw, "/v1/models", [("Authorization", f"Bearer {KEY_A}")])[0] == 200
    assert _call(mw, "/health")[0] == 200                              # open for load balancers
    assert _call(mw, "/app/health", root_path="/app")[0] == 200       # under a route prefix
    assert _call(mw, "/app/v1/models", root_path="/app")[0] == 401
    assert inner.paths == ["/v1/models", "/health", "/app/health"]


def test_middleware_when_off_and_when_not_ready():
    inner = _Inner()
    assert _call(APIKeyMiddleware(inner, lambda: None), "/v1/models")[0] == 200

    def not_there():
        raise RuntimeError("no replica")

    status, headers, body = _call(APIKeyMiddleware(inner, not_there), "/v1/models")
    assert status == 503 and json.loads(body)["error"]["code"] == "unavailable"    # closed, not open
    assert inner.paths == ["/v1/models"]


# -- body size ---------------------------------------------------------------------------------


def _chunks(parts: list[bytes], taken: list[int]):
    async def gen():
        for p in parts:
            taken.append(len(p))
            yield p
    return gen()


def _read(content_length, parts, limit, taken=None):
    return asyncio.run(protocol.read_body(content_length, _chunks(parts, taken if taken is not None else []), limit))


def test_read_body_limits():
    assert _read("10", [b"0123456789"], 10) == b"0123456789"
    assert _read(None, [b"01234", b"56789"], 10) == b"0123456789"
    taken: list[int] = []
    with pytest.raises(APIError) as err:
        _read("11", [b"x" * 11], 10, taken)
    assert err.value.status == 413 and err.value.code == "request_too_large" and taken == []   # nothing read
    taken = []
    with pytest.raises(APIError) as err:                  # chunked: counted as it arrives
        _read(None, [b"x" * 6, b"x" * 5, b"x" * 1000], 10, taken)
    assert err.value.status == 413 and taken == [6, 5]
    with pytest.raises(APIError) as err:                  # a Content-Length that lies is counted too
        _read("3", [b"x" * 11], 10)
    assert err.value.status == 413
    for bad in ("-1", "1e3", "ten", "", "\u0661\u0662"):
        with pytest.raises(APIError) as err:
            _read(bad, [b"{}"], 10)
        assert err.value.status == 400


# -- hostile bodies ----------------------------------------------------------------------------


def _convert(raw: bytes, kind: str = "completion", config: ServingConfig | None = None):
    config = config or ServingConfig()
    if kind == "completion":
        return protocol.completion_request(protocol.parse(protocol.CompletionRequest, raw), config)
    return protocol.chat_request(protocol.parse(protocol.ChatRequest, raw), config)


@pytest.mark.parametrize("raw,param,code", [
    (b"[" * 100_000 + b"]" * 100_000, None, "invalid_json"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "invalid_json"),
    (b'{"prompt": "caf\xc3"}', None, "invalid_json"),
    (b'{"prompt": "\xff\xfe"}', None, "invalid_json"),
    (b'{"prompt": "\\ud800"}', None, "invalid_json"),
    (b'{"prompt": "hi", "temperature": NaN}', "temperature", "invalid_value"),
    (b'{"prompt": "hi", "temperature": Infinity}', "temperature", "invalid_value"),
    (b'{"prompt": "hi", "temperature": 1e999}', "temperature", "invalid_value"),
    (b'{"prompt": "hi", "top_p": NaN}', "top_p", "invalid_value"),
    (b'{"prompt": "hi", "top_p": -Infinity}', "top_p", "invalid_value"),
    (b'{"prompt": "hi", "presence_penalty": NaN}', "presence_penalty", "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": -5}', "max_tokens", "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": 1000000000000000000000000000000}', "max_tokens", "invalid_value"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", None, "invalid_json"),
    (b'{"prompt": "hi", "seed": 18446744073709551616}', "seed", "invalid_value"),
    (b'{"prompt": "hi", "speculative": {"verification": "soft", "soft": {"lam": NaN}}}', "speculative.soft.lam",
     "invalid_value"),
])
def test_hostile_bodies_are_400(raw, param, code):
    with pytest.raises(APIError) as err:
        _convert(raw)
    e = err.value
    assert e.status == 400 and e.param == param and e.code == code, e
    assert "finite" in e.message if b"NaN" in raw or b"Infinity" in raw or b"e999" in raw else True


def test_max_tokens_bound_is_the_configured_one():
    config = ServingConfig.model_validate({"sampling": {"max_tokens_limit": 8, "completion_max_tokens": 4,
                                                        "chat_max_tokens": 4}})
    assert _convert(b'{"prompt": "hi", "max_tokens": 8}', config=config).params.max_new_tokens == 8
    assert _convert(b'{"prompt": "hi"}', config=config).params.max_new_tokens == 4
    chat = b'{"messages": [{"role": "user", "content": "hi"}]}'
    assert _convert(chat, "chat", config).params.max_new_tokens == 4
    for raw, kind, param in [(b'{"prompt": "hi", "max_tokens": 9}', "completion", "max_tokens"),
                             (chat[:-1] + b', "max_completion_tokens": 9}', "chat", "max_completion_tokens")]:
        with pytest.raises(APIError) as err:
            _convert(raw, kind, config)
        assert err.value.status == 400 and err.value.param == param and "at most 8" in err.value.message


# -- the OpenAPI document ----------------------------------------------------------------------


def _document(args: dict) -> dict:
    from fastapi import FastAPI

    from serving.ingress import app

    base = FastAPI.openapi(app)                  # FastAPI's own document of the routes
    app.openapi_schema = None
    return protocol.openapi_document(json.loads(json.dumps(base)), ServingConfig.model_validate(args))


def test_openapi_document_describes_bodies_errors_and_auth():
    doc = _document({"sampling": {"max_tokens_limit": 8, "completion_max_tokens": 4, "chat_max_tokens": 4},
                     "ingress": {"api_keys_env": "SENSE_API_KEYS"}})
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{name}"
        assert {"200", "400", "401", "404", "413", "503"} <= set(op["responses"])
        assert op["security"] == [{"bearerAuth": []}]
        assert schemas[name]["additionalProperties"] is False
        ints = [b for b in schemas[name]["properties"]["max_tokens"]["anyOf"] if b.get("type") == "integer"]
        assert ints == [{"type": "integer", "minimum": 1, "maximum": 8}]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    refs = {m.group(1) for m in re.finditer(r'"#/components/schemas/([^"]+)"', json.dumps(doc))}
    assert refs <= set(schemas)                  # every reference resolves
    validate_openapi(doc)

    plain = _document({})
    validate_openapi(plain)
    assert "securitySchemes" not in plain["components"]
    assert all("security" not in op for ops in plain["paths"].values() for op in ops.values())
