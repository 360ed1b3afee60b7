"""Access and bad input over real HTTP: a Serve application with API keys on (a key file and an
environment variable), a small body limit and tiny token limits, deployed like tests/test_serving.py's
on the shared 2-node test cluster. Authentication, the body limit, hostile bodies by hand, then
schemathesis fuzzing from the application's own /openapi.json; the replica must stay healthy and
the keys must not show up in any log. The units without Ray: tests/test_serving_auth.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests

from tests.test_serving import (
    APP,
    MODEL,
    PROXY_LOCATION,
    _assert_error,
    _dense_store_dir,
    _sparse_dir,
    body_for,
    decoder_infos,
    serve_config,
    sse_events,
    start_serve,
    stream_text,
    wait_app_running,
)

pytestmark = pytest.mark.slow

FILE_KEY = "sk-file-3f9a0c2e7d41b8a6"            # in the key file only: never passes through Ray
ENV_KEY = "sk-env-5b7e19c04d2a6f83"              # in the replica's environment (runtime_env here)
WRONG_KEY = "sk-wrong-c81d4e0a9b2f7365"
KEYS_ENV = "SENSE_TEST_API_KEYS"
MAX_BODY = 262144                                # fits the 100k-deep nesting below
MAX_TOKENS = 6                                   # sampling.max_tokens_limit: keeps fuzzing fast on a CPU
AUTH = {"Authorization": f"Bearer {FILE_KEY}"}
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"


class Server:
    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, path: str, body, headers=None, **kw) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) or body is None or hasattr(body, "__next__") \
            else json.dumps(body)
        h = {"Content-Type": "application/json", **AUTH, **(headers or {})}
        return requests.post(self.url + path, data=data, headers={k: v for k, v in h.items() if v is not None},
                             timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture(scope="module")
def stores(target, tmp_path_factory):
    """The test dense store (built once into the cache) and a REST index over 200 GSM8K answers:
    directories for the server, loaded copies for the engine."""
    from decoding.methods import Datastores
    from decoding.fingerprint import model_fingerprint
    from index.dense_store import DenseStore
    from index.sparse import SparseIndex

    dense = _dense_store_dir(target)
    sparse = _sparse_dir(target, tmp_path_factory.mktemp("security") / "sparse", 0, 200)
    local = Datastores(sparse=SparseIndex.load(sparse), dense=DenseStore.load(dense, expect=model_fingerprint(target)))
    return {"dense": str(dense), "sparse": str(sparse), "local": local}


@pytest.fixture(scope="module")
def server(ray_cluster, stores, tmp_path_factory):
    """The application, its ingress replica on the worker node (a node without the proxy: see
    test_one_http_proxy_although_a_replica_runs_on_the_worker_node)."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"# test keys\n\n{FILE_KEY}\n")
    args = {
        "model": {"name": MODEL, "torch_threads": 1, "dtype": "float32"},   # as the `target` fixture
        "index": {"version": "v1", "dense": stores["dense"], "sparse": stores["sparse"]},
        "speculative": {"method": "sense", "budget": 4, "max_budget": 8},
        "sampling": {"temperature": 0.0, "completion_max_tokens": 4, "chat_max_tokens": 4,
                     "max_tokens_limit": MAX_TOKENS},
        # The serialized decoder (each request its own decode loop, one forward at a time): the
        # option kept beside continuous batching, which the other serving tests run.
        "decoder": {"max_ongoing_requests": 2, "max_queued_requests": 8, "ray_actor_options": {"num_cpus": 1},
                    "graceful_shutdown_timeout_s": 5, "batching": False},
        "ingress": {"ray_actor_options": {"num_cpus": 0.25, "resources": {"worker": 0.01}},    # the worker node
                    "max_body_bytes": MAX_BODY, "api_keys_file": str(key_file), "api_keys_env": KEYS_ENV},
    }
    port = start_serve(ray_cluster.dashboard_url)
    client = ServeSubmissionClient(ray_cluster.dashboard_url)
    config = serve_config(port, args)
    config["applications"][0]["runtime_env"]["env_vars"][KEYS_ENV] = f" {ENV_KEY} ,"
    client.deploy_applications(config)
    url = f"http://127.0.0.1:{port}"
    wait_app_running(url)
    yield Server(url)
    serve.delete(config["applications"][0]["name"])


def _error(r, status: int, code=...) -> dict:
    return _assert_error(r, status, code=code)


# -- one proxy ---------------------------------------------------------------------------------


def test_one_http_proxy_although_a_replica_runs_on_the_worker_node(server, ray_cluster):
    """Every request of this module goes on a fresh connection to one host and port, and one
    proxy must own it. With a proxy on every node that has replicas, the worker node's would share
    the port (the nodes are this machine; Serve binds with SO_REUSEPORT), and when drained and
    killed (its node left without replicas) it dropped the requests it had taken: the fuzzing's
    occasional RemoteDisconnected. See PROXY_LOCATION in tests/test_serving.py."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(ray_cluster.dashboard_url).get_serve_details()
    head = ray_cluster.head_node.node_id
    ingress = details["applications"][APP]["deployments"]["Ingress"]["replicas"]
    assert ingress and all(r["node_id"] != head for r in ingress), ingress      # a replica off the head node
    assert details["proxy_location"] == PROXY_LOCATION
    assert list(details["proxies"]) == [head], details["proxies"]                # and still one proxy
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=30).status_code == 200


# -- authentication ----------------------------------------------------------------------------


def test_keys_are_required_and_refusals_say_nothing_more(server):
    url = server.url
    refusals = []
    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": f"Bearer {FILE_KEY}x"},
                    {"Authorization": f"Bearer {FILE_KEY[:-1]}"}, {"Authorization": f"Basic {FILE_KEY}"},
                    {"Authorization": "Bearer "}, {"X-API-Key": FILE_KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", CMPL), ("POST", CHAT), ("GET", "/openapi.json"),
                             ("GET", "/docs"), ("GET", "/v1/nothing"), ("GET", "/metrics")):
            body = json.dumps({"prompt": "hi", "max_tokens": 1}) if method == "POST" else None
            r = requests.request(method, url + path, data=body, timeout=30,
                                 headers={"Content-Type": "application/json", **headers})
            _error(r, 401, "invalid_api_key")
            assert r.headers["WWW-Authenticate"] == "Bearer"
            refusals.append(r.content)
    assert len(set(refusals)) == 1                 # missing, malformed and wrong keys: one answer
    # Authentication comes before the body is read: an oversized body without a key is a 401.
    r = requests.post(url + CMPL, data=b"x" * (MAX_BODY * 4), timeout=30)
    _error(r, 401, "invalid_api_key")

    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"      # open: load balancers
    for key in (FILE_KEY, ENV_KEY):
        h = {"Authorization": f"Bearer {key}"}
        r = requests.get(url + "/v1/models", headers=h, timeout=30)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
        r = requests.post(url + CMPL, json={"prompt": "The capital of France is", "max_tokens": 2}, headers=h,
                          timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    lower = {"Authorization": f"bearer {ENV_KEY}"}
    assert requests.get(url + "/v1/models", headers=lower, timeout=30).status_code == 200
    _error(requests.get(url + "/v1/nothing", headers=AUTH, timeout=30), 404, "not_found")
    doc = requests.get(url + "/openapi.json", headers=AUTH, timeout=30).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_openai_client_with_an_api_key(server):
    import openai

    kw = dict(base_url=server.url + "/v1", max_retries=0, timeout=120)
    client = openai.OpenAI(api_key=ENV_KEY, **kw)
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2 and isinstance(r.choices[0].text, str)
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(api_key=WRONG_KEY, **kw).models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


# -- body size ---------------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (padded in the `user` field)."""
    head, tail = b'{"prompt": "Hi", "max_tokens": 1, "user": "', b'"}'
    return head + b"u" * (size - len(head) - len(tail)) + tail


def test_body_size_limit(server):
    r = server.post(CMPL, _padded(MAX_BODY))
    assert r.status_code == 200, r.text                     # exactly the limit: served
    _error(server.post(CMPL, _padded(MAX_BODY + 1)), 413, "request_too_large")   # one byte over
    _error(server.post(CHAT, b"[" * (MAX_BODY * 8)), 413, "request_too_large")

    def chunked(body: bytes, size: int = 4096):            # no Content-Length: counted as it arrives
        return (body[i:i + size] for i in range(0, len(body), size))

    r = server.post(CMPL, chunked(_padded(MAX_BODY)))
    assert r.status_code == 200, r.text
    _error(server.post(CMPL, chunked(_padded(MAX_BODY + 1))), 413, "request_too_large")
    _error(server.post(CMPL, chunked(b" " * (MAX_BODY * 8), 65536)), 413, "request_too_large")


# -- hostile bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("path,raw,param,code", [
    (CHAT, b"[" * 100_000 + b"]" * 100_000, None, "invalid_json"),           # too deep to parse
    (CMPL, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "invalid_json"),
    (CMPL, b'{"prompt": "caf\xc3"}', None, "invalid_json"),                   # invalid UTF-8
    (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None, "invalid_json"),
    (CMPL, b'{"prompt": "hi", "temperature": NaN}', "temperature", "invalid_value"),
    (CMPL, b'{"prompt": "hi", "temperature": Infinity}', "temperature", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "top_p", "invalid_value"),
    (CMPL, b'{"prompt": "hi", "max_tokens": -1}', "max_tokens", "invalid_value"),
    (CMPL, b'{"prompt": "hi", "max_tokens": 100000000000000000000000000000000}', "max_tokens", "invalid_value"),
    (CMPL, f'{{"prompt": "hi", "max_tokens": {MAX_TOKENS + 1}}}'.encode(), "max_tokens", "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99999999999}',
     "max_completion_tokens", "invalid_value"),
    (CMPL, b'{"prompt": "hi", "seed": 100000000000000000000000000000}', "seed", "invalid_value"),
    (CMPL, b'{"prompt": [99999999999999999999]}', "prompt", "invalid_value"),
], ids=["nesting-100k", "nesting-5k", "utf8-truncated", "utf8-invalid", "temperature-nan", "temperature-inf",
        "top_p-nan", "top_p-minus-inf", "max_tokens-negative", "max_tokens-enormous", "max_tokens-over-limit",
        "max_completion_tokens-enormous", "seed-overflow", "token-id-enormous"])
def test_hostile_bodies_are_clear_400s(server, path, raw, param, code):
    err = _error(server.post(path, raw), 400, code)
    assert err["param"] == param, err
    if param in ("temperature", "top_p"):
        assert "finite" in err["message"]
    if param in ("max_tokens", "max_completion_tokens") and b"-1" not in raw:
        assert f"at most {MAX_TOKENS}" in err["message"]


@pytest.mark.parametrize("kind,prompt", [("completion", "<|im_start|><|im_end|><|endoftext|>"),
                                         ("completion", [0, 1, 2, 2]), ("chat", "<|im_end|><|endoftext|>")])
def test_special_token_prompts_and_unmatched_stops_complete(server, target, stores, kind, prompt):
    """Prompts made only of special tokens, and stop strings that never match: a correct
    completion (the engine's, token for token), streamed and not."""
    stop = ["\u2603never\u2603", "zq#@!x"]
    path = CHAT if kind == "chat" else CMPL
    body = body_for(kind, prompt if isinstance(prompt, str) else "", method="pld", budget=4,
                    max_tokens=MAX_TOKENS, stop=stop, ignore_eos=True)
    if not isinstance(prompt, str):
        body["prompt"] = prompt
    r = server.post(path, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == MAX_TOKENS
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter

    ids = encode_prompt(target, prompt, chat=kind == "chat") if isinstance(prompt, str) else prompt
    want = generate(target, ids, params=SamplingParams(max_new_tokens=MAX_TOKENS, stop=tuple(stop), ignore_eos=True),
                    drafter=make_drafter("pld", stores["local"]), budget=4)
    assert choice["token_ids"] == want.token_ids
    assert (choice["message"]["content"] if kind == "chat" else choice["text"]) == want.text
    events = sse_events(server.post(path, {**body, "stream": True}, stream=True))
    text, ids = stream_text(events, kind)
    assert events[-1] == "[DONE]" and ids == choice["token_ids"]
    assert text == (choice["message"]["content"] if kind == "chat" else choice["text"])


def test_the_serialized_decoder_matches_the_engine(server, target, stores):
    """With ``decoder.batching: false`` two SENSE requests at once run side by side, one forward at
    a time, and each answer is the engine's token for token; the replica runs no batch loop."""
    from concurrent.futures import ThreadPoolExecutor

    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter

    questions = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]
    assert all(i["batch"] is None for i in decoder_infos().values())
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda q: server.post(CHAT, body_for("chat", q, method="sense", budget=4,
                                                                   max_tokens=MAX_TOKENS, ignore_eos=True)),
                             questions))
    for q, r in zip(questions, outs):
        assert r.status_code == 200, r.text
        want = generate(target, encode_prompt(target, q), params=SamplingParams(max_new_tokens=MAX_TOKENS,
                                                                                ignore_eos=True),
                        drafter=make_drafter("sense", stores["local"]), budget=4)
        assert r.json()["choices"][0]["token_ids"] == want.token_ids


# -- fuzzing from the OpenAPI document ---------------------------------------------------------

EXAMPLES = {"positive": 40, "negative": 40}     # per operation and mode; derandomized (fixed seed)


def _header(resp, name: str) -> str:
    for k, v in resp.headers.items():
        if k.lower() == name:
            return v[0] if isinstance(v, list) else v
    return ""


def _check_response(resp, label: str) -> None:
    """No 5xx; a non-2xx answer is an OpenAI error body; a 2xx stream is well-formed SSE."""
    assert resp.status_code < 500, f"{label}: {resp.status_code} {resp.content[:300]!r}"
    ctype = _header(resp, "content-type")
    if resp.status_code >= 300:
        assert ctype.startswith("application/json"), (label, resp.status_code, ctype)
        err = json.loads(resp.content)["error"]
        assert set(err) == {"message", "type", "param", "code"}, (label, err)
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (label, err)
        assert all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")), (label, err)
    elif ctype.startswith("text/event-stream"):
        lines = [x for x in resp.content.decode().split("\n\n") if x]
        assert lines[-1] == "data: [DONE]", (label, lines[-3:])
        for x in lines[:-1]:
            assert x.startswith("data: "), (label, x)
            event = json.loads(x[len("data: "):])
            assert "choices" in event or set(event) == {"error"}, (label, event)
    else:
        assert ctype.startswith("application/json"), (label, ctype)
        json.loads(resp.content)


def test_fuzz_from_the_openapi_document(server):
    """schemathesis cases for every operation of /openapi.json, schema-valid and not, each sent
    with a valid key and then with the credentials schemathesis made up (never valid: a 401)."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH, timeout=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection, ignored_auth]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {f"POST {CMPL}", f"POST {CHAT}", "GET /v1/models", "GET /health"}
    sent = {"2xx": 0, "4xx": 0, "401": 0}

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.settings(max_examples=EXAMPLES[mode.value], derandomize=True, database=None, deadline=None,
                                 phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                label = f"{op.label} ({mode.value}): {case.as_curl_command(base_url=server.url)}"
                resp = case.call(base_url=server.url, headers=AUTH, timeout=120)
                _check_response(resp, label)
                case.validate_response(resp, checks=checks, headers=AUTH)
                sent["2xx" if resp.status_code < 300 else "4xx"] += 1
                made_up = (case.headers or {}).get("Authorization")
                if op.label != "GET /health" and made_up is not None:      # schemathesis's own credentials
                    resp = case.call(base_url=server.url, timeout=120)
                    _check_response(resp, label + " [generated credentials]")
                    assert resp.status_code == 401, label
                    sent["401"] += 1

            try:
                fuzz()
            except Unsatisfiable:       # nothing to negate (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE
    assert sent["2xx"] >= 5 and sent["4xx"] >= 10 and sent["401"] >= 5, sent

    # The replica is still there and serves normally.
    assert requests.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    r = server.post(CHAT, body_for("chat", "What is 2 + 3?", method="sense", budget=4, max_tokens=MAX_TOKENS))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


# -- logs --------------------------------------------------------------------------------------


def test_keys_never_reach_the_logs(server):
    """After every test above (keys right and wrong, in headers and failed requests), no log of
    the cluster holds the file key or a wrong key a client sent."""
    import ray

    r = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"}, timeout=30)
    assert r.status_code == 401
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert logs.is_dir()
    scanned, found = 0, []
    for f in logs.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            scanned += 1
            found += [f"{f.name}: {k}" for k in (FILE_KEY, WRONG_KEY) if k.encode() in data]
    assert scanned > 10 and not found, found
    assert re.search(rb"API-key authentication on: 2 key", b"".join(
        f.read_bytes() for f in logs.rglob("*Ingress*") if f.is_file())), "the ingress did not log its key count"
