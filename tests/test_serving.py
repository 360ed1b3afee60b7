"""The Ray Serve application end to end: real HTTP against a real local 2-node Ray cluster, the
embedded model, small datastores, two index shards.

One application (deployed declaratively through the dashboard's REST API, exactly as
`serve deploy` would, with `import_path: serving.app:build_app`) serves every test of this
module; tests that disturb it (autoscaling, hot swap, shard loss) run last.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import requests

from support import net
from support.net import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
APP = "sense"
MODEL = "sense-test"
DENSE_DOCS = 8                  # GSM8K train pairs in the test dense store (built once, cached)
QUESTIONS = [                   # the first GSM8K train questions: their answers are in the dense store
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
]


# -- datastores --------------------------------------------------------------------------------


def _dense_store_dir(target) -> Path:
    """A small dense datastore over the first GSM8K train pairs, built once into the cache."""
    from filelock import FileLock

    from decoding.model_loader import cache_root
    from decoding.demo_stores import gsm8k_documents
    from decoding.dense_extract import build_dense_datastore
    from decoding.fingerprint import model_fingerprint
    from index.dense_format import MANIFEST

    # Keyed by the model's fingerprint: a store of other weights (or an older hash) is never reused.
    fp = model_fingerprint(target)
    path = cache_root() / "datastores" / f"serving-test-dense{DENSE_DOCS}-{fp.weights_hash}-{fp.tokenizer_hash}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / MANIFEST).is_file():
            build_dense_datastore(target, gsm8k_documents(target, DENSE_DOCS), path, dim=32, value_len=8)
    return path


def _sparse_dir(target, path: Path, start: int, n: int) -> Path:
    from decoding.demo_stores import encode_text
    from index.corpus import gsm8k_sparse_index

    gsm8k_sparse_index(encode_text(target), start=start, stop=start + n).save(path)
    return path


@pytest.fixture(scope="module")
def stores(target, tmp_path_factory):
    """Directories and in-process copies of the stores the server uses."""
    from decoding.methods import Datastores
    from decoding.fingerprint import model_fingerprint
    from index.dense_store import DenseStore
    from index.sparse import SparseIndex

    tmp = tmp_path_factory.mktemp("serving")
    dense = _dense_store_dir(target)
    sparse = _sparse_dir(target, tmp / "sparse1", 0, 400)
    sparse2 = _sparse_dir(target, tmp / "sparse2", 400, 200)
    local = Datastores(sparse=SparseIndex.load(sparse), dense=DenseStore.load(dense, expect=model_fingerprint(target)))
    return {"dense": str(dense), "sparse": str(sparse), "sparse2": str(sparse2), "local": local}


@pytest.fixture(scope="module")
def artifact(ray_cluster, stores, tmp_path_factory):
    """The test dense store published as an index artifact with 2 dense shards (not merged) and
    its REST index, built by index.artifact_build on the test cluster."""
    from index.artifact_build import BuildConfig
    from pipelines.build_index import build_artifact

    root = tmp_path_factory.mktemp("artifact") / "index"
    build_artifact(BuildConfig(datastore=stores["dense"], output=str(root), shards=2, merge=False,
                               calibration_queries=50), progress=None)
    return str(root)


# -- the application ---------------------------------------------------------------------------


def app_args(stores) -> dict:
    return {
        "model": {"name": MODEL, "torch_threads": 1, "dtype": "float32"},   # as the `target` fixture
        "index": {"version": "v1", "dense": stores["dense"], "sparse": stores["sparse"]},
        "speculative": {"method": "sense", "budget": 8},
        "sampling": {"temperature": 0.0},
        "decoder": {"max_ongoing_requests": 2, "max_queued_requests": 4, "ray_actor_options": {"num_cpus": 1},
                    "graceful_shutdown_timeout_s": 20,
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                           "upscale_delay_s": 1, "downscale_delay_s": 4,
                                           "metrics_interval_s": 0.5, "look_back_period_s": 2}},
        "shards": {"num_shards": 2, "ray_actor_options": {"num_cpus": 0.25}, "search_timeout_s": 1.0,
                   "cooldown_s": 2.0},
        "ingress": {"ray_actor_options": {"num_cpus": 0.25}, "overload_status": 503, "retry_after_s": 2},
    }


# Where Serve runs its HTTP proxies on the test cluster: the head node only. Every node of the
# cluster is this machine, and Serve binds each node's proxy to the same host and port with
# SO_REUSEPORT, so with a proxy on every node that has replicas (Serve's default) the kernel
# spreads new connections over several proxies. A node's proxy is drained and then killed when
# its last replica leaves the node (an earlier module's application deleted, a replica placed
# elsewhere), and until the kill the kernel keeps handing it connections: a request it has read
# loses its connection without a response (RemoteDisconnected), one it has not is reset. On a
# real cluster each proxy has its own address and the load balancer stops sending to a draining
# one (its /-/healthz answers 503) before it goes. One proxy, whatever nodes the replicas run on.
PROXY_LOCATION = "HeadOnly"


def start_serve(dashboard_url: str) -> int:
    """Start Serve on the test cluster with its one HTTP proxy on the head node and return the
    proxy's port. Serve keeps the options it was first started with (later calls in the session
    find it running), so this checks them instead of trusting them."""
    from ray import serve
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    serve.start(proxy_location=PROXY_LOCATION, http_options={"host": "127.0.0.1", "port": free_port()})
    details = ServeSubmissionClient(dashboard_url).get_serve_details()
    assert details["proxy_location"] == PROXY_LOCATION, \
        f"Serve runs with proxy_location {details['proxy_location']}: start it with start_serve()"
    return details["http_options"]["port"]


def serve_config(port: int, args: dict, deployments: list | None = None) -> dict:
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    if os.environ.get("SENSE_CACHE_DIR"):
        env["SENSE_CACHE_DIR"] = os.environ["SENSE_CACHE_DIR"]
    app = {"name": APP, "route_prefix": "/", "import_path": "serving.app:build_app",
           "runtime_env": {"env_vars": env}, "args": args}
    if deployments:
        app["deployments"] = deployments
    return {"proxy_location": PROXY_LOCATION, "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [app]}


class Server:
    def __init__(self, url, client, port, args) -> None:
        self.url, self.client, self.port, self.args = url, client, port, args

    def post(self, path: str, body, **kw) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers={"Content-Type": "application/json"},
                             timeout=kw.pop("timeout", 120), **kw)


def app_status():
    from ray import serve

    return serve.status().applications.get(APP)


def running_replicas(deployment: str) -> int:
    st = app_status()
    return st.deployments[deployment].replica_states.get("RUNNING", 0) if st else 0


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    value = net.wait_for(cond, timeout, every)
    if not value:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    return value


def wait_app_running(url: str, timeout: float = 300) -> None:
    def ready():
        st = app_status()
        if st is not None and st.status == "DEPLOY_FAILED":
            raise AssertionError(f"deployment failed: {st.message}")
        if st is None or st.status != "RUNNING":
            return False
        try:
            h = requests.get(url + "/health", timeout=10).json()
        except Exception:
            return False
        return h.get("status") == "ok" and h["decoder"]["index"]["dense"]

    wait_for(ready, timeout, "the application to run with its index")


def start_server(ray_cluster, args: dict) -> Server:
    """Deploy the application with `args` on the test cluster (declaratively, through the
    dashboard, as `serve deploy` would) and wait until it serves with its index."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    port = start_serve(ray_cluster.dashboard_url)     # the running Serve's, if one existed
    client = ServeSubmissionClient(ray_cluster.dashboard_url)
    client.deploy_applications(serve_config(port, args))
    url = f"http://127.0.0.1:{port}"
    wait_app_running(url)
    return Server(url, client, port, args)


@pytest.fixture(scope="module")
def server(ray_cluster, stores):
    from ray import serve

    yield start_server(ray_cluster, app_args(stores))
    serve.delete(APP)


# -- helpers -----------------------------------------------------------------------------------


def engine(target, stores, kind: str, text: str, *, method: str, max_tokens: int, stop=(), budget: int = 8):
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter

    ids = encode_prompt(target, text, chat=kind == "chat")
    return generate(target, ids, params=SamplingParams(max_new_tokens=max_tokens, stop=tuple(stop)),
                    drafter=make_drafter(method, stores["local"]), budget=budget)


def body_for(kind: str, text: str, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}
    spec = {"return_token_ids": True}
    for key in ("method", "budget", "verification", "soft"):
        if key in kw:
            spec[key] = kw.pop(key)
    body.update(kw, speculative=spec)
    return body


def sse_events(resp: requests.Response) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            out.append("[DONE]")
            break
        out.append(json.loads(data))
    return out


def stream_text(events: list, kind: str) -> tuple[str, list[int]]:
    text, ids = "", []
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        c = e["choices"][0]
        text += (c["delta"].get("content") or "") if kind == "chat" else c["text"]
        ids += c.get("token_ids") or []
    return text, ids


def decoder_infos(rounds: int = 8) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("Decoder", APP)
    infos = {}
    for _ in range(rounds):
        info = handle.info.remote().result(timeout_s=30)
        infos[info["replica"]] = info
    return infos


# -- tests -------------------------------------------------------------------------------------


def test_health_and_models(server):
    # Before any request (this module's first test): every decoder replica warmed up at its start
    # (its prompt kept in the prefix cache) and counted none of it.
    for info in decoder_infos().values():
        cache = info["prefix_cache"]
        assert cache["entries"] == 1 and cache["lookups"] == cache["prefilled_tokens"] == 0, cache
        assert info["completed"] == info["errors"] == 0 and info["batch"]["forwards"] == 0, info
    h = requests.get(server.url + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["model"] == MODEL
    assert h["decoder"]["index"]["mode"] == "sharded" and h["decoder"]["shards"]["shards"] == 2
    assert h["decoder"]["prefix_cache"]["note"].startswith("on") and "reused_tokens" in h["decoder"]["prefix_cache"]
    m = requests.get(server.url + "/v1/models", timeout=30).json()
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == [MODEL]


CASES = [("chat", QUESTIONS[0], "sense", ()), ("chat", QUESTIONS[1], "pld", ()),
         ("completion", "The capital of France is", "ar", ()), ("chat", QUESTIONS[0], "rest", (".",))]


@pytest.mark.parametrize("kind,text,method,stop", CASES)
def test_strict_mode_matches_the_engine(server, target, stores, kind, text, method, stop):
    want = engine(target, stores, kind, text, method=method, max_tokens=24, stop=stop)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = body_for(kind, text, method=method, budget=8, max_tokens=24, stop=list(stop) or None)

    r = server.post(path, body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["token_ids"] == want.token_ids
    assert (choice["message"]["content"] if kind == "chat" else choice["text"]) == want.text
    assert choice["finish_reason"] == want.finish_reason
    spec = out["speculative"]
    assert spec["method"] == method and spec["verification"] == "strict" and spec["fallback"] is None
    assert spec["steps"] == want.stats.steps and spec["accepted_tokens"] == want.stats.accepted
    assert spec["mat"] == pytest.approx(want.stats.mat, abs=1e-3)
    assert out["usage"]["completion_tokens"] == len(want.token_ids)
    if method == "sense":
        assert spec["index"]["mode"] == "sharded" and spec["index"]["searches"] > 0
        assert spec["index"]["partial_searches"] == 0

    r = server.post(path, {**body, "stream": True}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    text_out, ids = stream_text(events, kind)
    assert ids == want.token_ids and text_out == want.text
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == want.finish_reason
    assert last["speculative"]["steps"] == want.stats.steps
    assert all("speculative" not in e for e in events[:-2])


def test_concurrent_requests_share_forwards_and_match_the_engine(server, target, stores):
    """Continuous batching over HTTP: two strict requests sent at once to the one running decoder
    replica are verified in shared forwards (its forward count grows by less than their steps
    together) and each answer is the in-process engine's, token for token."""
    from concurrent.futures import ThreadPoolExecutor

    assert running_replicas("Decoder") == 1
    cases = [(QUESTIONS[0], "sense"), (QUESTIONS[1], "pld")]
    want = [engine(target, stores, "chat", q, method=m, max_tokens=32) for q, m in cases]
    before = decoder_infos()
    assert all(i["lean_forward"] == "on" and i["batch"] is not None for i in before.values()), before
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda c: server.post("/v1/chat/completions",
                                                   body_for("chat", c[0], method=c[1], budget=8, max_tokens=32)),
                             cases))
    after = decoder_infos()
    for r, w in zip(outs, want):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == w.token_ids
    assert all("drafting_gate" in i["batch"] for i in after.values()), after     # /health: its verdict per load
    forwards = sum(i["batch"]["forwards"] for i in after.values()) - sum(i["batch"]["forwards"] for i in before.values())
    steps = sum(r.json()["speculative"]["steps"] for r in outs)
    assert 0 < forwards < steps, (forwards, steps)


def test_openai_client(server, target, stores):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    want = engine(target, stores, "chat", QUESTIONS[1], method="pld", max_tokens=16)
    extra = {"speculative": {"method": "pld", "budget": 8}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                       max_tokens=16, temperature=0, extra_body=extra)
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.model_extra["speculative"]["steps"] == want.stats.steps

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].model_extra["speculative"]["mat"] == pytest.approx(want.stats.mat, abs=1e-3)
    # The same prompt again, on the one decoder replica: all of it but its last token from the
    # prefix cache (what a prefill runs: tests/test_prefix_cache.py), the same answer.
    assert running_replicas("Decoder") == 1
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1

    # OpenAI's Predicted Outputs: the same answer, more tokens a step where it follows the
    # prediction (through the sharded index's fallback wrapper: SENSE), and the usage details.
    want = engine(target, stores, "chat", QUESTIONS[0], method="sense", max_tokens=32)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                           extra_body={"speculative": {"method": "sense", "budget": 4}})
    assert plain.choices[0].message.content == want.text and plain.usage.completion_tokens_details is None
    for prediction, accepted in ((want.text, len(want.token_ids)), ("Paris is the capital of France.", None)):
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                           prediction={"type": "content", "content": prediction},
                                           extra_body={"speculative": {"method": "sense", "budget": 4}})
        assert r.choices[0].message.content == want.text
        details = r.usage.completion_tokens_details
        if accepted is not None:
            assert details.accepted_prediction_tokens == accepted and details.rejected_prediction_tokens == 0
            assert r.model_extra["speculative"]["mat"] >= 4.0        # (a budget of 4: at most 5 a step)
        else:
            assert details.accepted_prediction_tokens < len(want.token_ids)

    # Log-probabilities: the engine's, bitwise, drafted or not, streamed or not.
    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate

    ids = encode_prompt(target, QUESTIONS[1])
    want = generate(target, ids, params=SamplingParams(max_new_tokens=16), budget=0, logprobs=2)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                       max_tokens=16, temperature=0, logprobs=True, top_logprobs=2, extra_body=extra)
    got = r.choices[0].logprobs.content
    assert [e.logprob for e in got] == [x.logprob for x in want.logprobs]
    assert [[t.logprob for t in e.top_logprobs] for e in got] == [[v for _, v in x.top] for x in want.logprobs]
    assert "".join(e.token for e in got) == target.tokenizer.decode(want.token_ids)
    streamed = [e for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=16, temperature=0,
        logprobs=True, top_logprobs=2, stream=True, extra_body=extra) if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in got]

    want = engine(target, stores, "completion", "The capital of France is", method="ar", max_tokens=8)
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  logprobs=1, extra_body={"speculative": {"method": "ar"}})
    assert c.choices[0].text == want.text
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(want.token_ids)
    assert lp.text_offset[0] == 0 and all(v <= 0 for v in lp.token_logprobs)
    # As lm-evaluation-harness scores a continuation: token ids, echo, one new token, logprobs 1.
    prompt = target.tokenizer("The capital of France is Paris")["input_ids"]
    scored = generate(target, prompt, params=SamplingParams(max_new_tokens=1), budget=0, logprobs=1,
                      prompt_logprobs=1)
    e = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == target.tokenizer.decode(prompt, skip_special_tokens=True) + scored.text
    assert lp.token_logprobs == [None] + [r.logprob for r in scored.prompt_logprobs + scored.logprobs]
    assert lp.top_logprobs[0] is None and len(lp.tokens) == len(prompt) + 1
    streamed = list(client.completions.create(model=MODEL, prompt=[prompt], max_tokens=1, temperature=0, logprobs=1,
                                              echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == e.choices[0].text
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [v for c in chunks for v in c.token_logprobs] == lp.token_logprobs
    assert [v for c in chunks for v in c.text_offset] == lp.text_offset
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("org/gpt-9")
    assert err.value.status_code == 404 and "gpt-9" in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"speculative": {"method": "magic"}})
    assert err.value.status_code == 400 and err.value.param == "speculative.method"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_choices_penalties_and_logit_bias(server, target, stores):
    """n choices (each its own request, side by side; seeded choice i samples with seed + i),
    penalties and a logit bias: every choice the engine's own answer, streamed or not."""
    import openai

    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    ids = encode_prompt(target, QUESTIONS[0])
    adjust = dict(frequency_penalty=0.5, presence_penalty=0.3, logit_bias={"28": -100})
    extra = {"speculative": {"method": "sense", "budget": 6}}

    def want(seed=None, temperature=0.0, **kw):
        params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=seed,
                                **{k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v)
                                   for k, v in kw.items()})
        return generate(target, ids, params=params, drafter=make_drafter("sense", stores["local"]), budget=6).text

    greedy = want(**adjust)
    assert greedy != want()                     # the adjustments change this answer
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_body=extra,
                                       **adjust)
    assert r.choices[0].message.content == greedy

    sampled = [want(seed=11 + i, temperature=0.9, **adjust) for i in range(3)]
    assert len(set(sampled)) > 1
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.9, seed=11, n=3,
                                       extra_body=extra, **adjust)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == sampled
    single = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.9, seed=11,
                                            extra_body=extra, **adjust)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert isinstance(r.model_extra["speculative"], list) and len(r.model_extra["speculative"]) == 3
    assert r.usage.completion_tokens == sum(s["completion_tokens"] for s in r.model_extra["speculative"])

    texts, finished, usage = {}, set(), None
    for c in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0.9, seed=11,
                                            n=3, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra, **adjust):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished.add(ch.index)
        usage = c.usage or usage
    assert [texts[i] for i in range(3)] == sampled and finished == {0, 1, 2}
    assert usage.completion_tokens == r.usage.completion_tokens

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, n=2,
                                     extra_body={"speculative": {"method": "pld"}})
    assert len(done.choices) == 2 and done.choices[0].text == done.choices[1].text

    with pytest.raises(openai.BadRequestError) as err:          # outside the vocabulary: found by the decoder
        client.chat.completions.create(model=MODEL, messages=messages, logit_bias={str(target.vocab_size): 5})
    assert err.value.param == "logit_bias"


def test_structured_outputs(server, target, stores):
    """response_format json_object and json_schema over HTTP: the engine's constrained answer,
    streamed or not, valid JSON of the schema."""
    import openai

    from decoding.config import SamplingParams
    from decoding.engine import encode_prompt, generate
    from decoding.methods import make_drafter
    from decoding.structured import Grammar

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
              "required": ["answer", "unit"], "additionalProperties": False}
    question = QUESTIONS[1] + " Answer in JSON."
    messages = [{"role": "user", "content": question}]
    ids = encode_prompt(target, question)
    extra = {"speculative": {"method": "sense", "budget": 6}}
    for fmt, grammar in (({"type": "json_object"}, Grammar.json_object()),
                         ({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
                          Grammar.json_schema(schema))):
        want = generate(target, ids, params=SamplingParams(max_new_tokens=48),
                        drafter=make_drafter("sense", stores["local"]), budget=6, grammar=grammar)
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                           response_format=fmt, extra_body=extra)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=48, temperature=0, response_format=fmt, stream=True,
            extra_body=extra) if c.choices)
        assert streamed == want.text
    assert want.finish_reason == "stop" and set(json.loads(want.text)) == {"answer", "unit"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "bogus"}}})
    assert err.value.param == "response_format"


def test_tool_calls(server, target, stores):
    """A named tool choice over HTTP: the engine's constrained answer, returned as a call of the
    function with JSON arguments of its schema, streamed or not; a tool's result then goes back
    as a turn."""
    import openai

    from decoding.config import SamplingParams
    from decoding.engine import generate
    from decoding.methods import make_drafter
    from serving import protocol
    from serving.config import ServingConfig
    from serving.tools import parse_calls

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {
        "name": "multiply", "description": "Multiply two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "What is 12 times 34?"}]
    choice = {"type": "function", "function": {"name": "multiply"}}
    extra = {"speculative": {"method": "sense", "budget": 6}}
    body = {"messages": messages, "tools": tools, "tool_choice": choice, "max_tokens": 40, "temperature": 0}
    gen = protocol.chat_request(protocol.parse(protocol.ChatRequest, json.dumps(body).encode()),
                                ServingConfig.from_args(app_args(stores)))
    ids = list(target.tokenizer.apply_chat_template(gen.messages, add_generation_prompt=True)["input_ids"])
    want = generate(target, ids, params=SamplingParams(max_new_tokens=40), drafter=make_drafter("sense", stores["local"]),
                    budget=6, grammar=gen.grammar)
    want_call = parse_calls(want.text, {"multiply"})[0]["function"]

    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice, max_tokens=40,
                                       temperature=0, extra_body=extra)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (want_call["name"], want_call["arguments"])
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())

    streamed, finish = [], None
    for ch in client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice,
                                             max_tokens=40, temperature=0, stream=True, extra_body=extra):
        if ch.choices:
            streamed += ch.choices[0].delta.tool_calls or []
            finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(t.function.name, t.function.arguments) for t in streamed] == \
        [(call.function.name, call.function.arguments)]

    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": str(args["a"] * args["b"])}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=tools, max_tokens=24, temperature=0,
                                       extra_body=extra)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _assert_error(r: requests.Response, status: int, param=..., code=...):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def test_errors_are_openai_style(server, target):
    msgs = [{"role": "user", "content": "hi"}]
    chat = "/v1/chat/completions"
    _assert_error(server.post(chat, b'{"messages": [ bad json'), 400, None, "invalid_json")
    _assert_error(server.post(chat, b"[1, 2, 3]"), 400, None)
    _assert_error(server.post(chat, b""), 400, None, "invalid_json")
    _assert_error(server.post(chat, {"messages": msgs, "frobnicate": True}), 400, "frobnicate", "unknown_parameter")
    _assert_error(server.post(chat, {"messages": msgs, "speculative": {"method": "magic"}}), 400, "speculative.method")
    _assert_error(server.post(chat, {"messages": msgs, "speculative": {"verification": "maybe"}}), 400,
                  "speculative.verification")
    _assert_error(server.post(chat, {"messages": msgs, "temperature": -1}), 400, "temperature")
    _assert_error(server.post(chat, {"messages": msgs, "top_p": 1.5}), 400, "top_p")
    _assert_error(server.post(chat, {"messages": msgs, "max_tokens": 0}), 400, "max_tokens")
    _assert_error(server.post(chat, {"messages": msgs, "speculative": {"budget": 100000}}), 400,
                  "speculative.budget")
    _assert_error(server.post(chat, {"messages": msgs, "n": 9}), 400, "n")
    _assert_error(server.post(chat, {"messages": msgs, "logit_bias": {"x1": 2}}), 400, "logit_bias")
    _assert_error(server.post(chat, {"messages": msgs, "logit_bias": {"1": 200}}), 400, "logit_bias.1")
    _assert_error(server.post(chat, {"messages": msgs, "frequency_penalty": 2.5}), 400, "frequency_penalty")
    _assert_error(server.post(chat, {"messages": msgs, "stream": True, "temperature": 9}), 400, "temperature")
    _assert_error(server.post(chat, {"messages": msgs, "model": "gpt-9"}), 404, "model", "model_not_found")
    # A prompt longer than the context window, as token ids and as chat text; streamed too.
    too_long = [1] * target.context_window
    _assert_error(server.post("/v1/completions", {"prompt": too_long}), 400, "prompt", "context_length_exceeded")
    long_chat = {"messages": [{"role": "user", "content": "hello " * target.context_window}], "stream": True}
    _assert_error(server.post(chat, long_chat), 400, "messages", "context_length_exceeded")
    _assert_error(server.post("/v1/completions", {"prompt": [target.vocab_size + 5]}), 400, "prompt")
    _assert_error(server.post(chat, {"messages": msgs, "speculative": {"method": "sense", "soft": {"lam": 0.5}}}),
                  400, "speculative.soft")
    # Unknown routes and methods.
    _assert_error(requests.get(server.url + "/v1/nothing", timeout=30), 404, None, "not_found")
    _assert_error(requests.get(server.url + "/v1/completions", timeout=30), 405)


def test_soft_verification_reports_its_gates(server):
    body = body_for("chat", QUESTIONS[0], method="sense", budget=8, max_tokens=24, verification="soft",
                    soft={"theta": 0.1, "window": 2})
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    spec = r.json()["speculative"]
    assert spec["verification"] == "soft" and set(spec["soft_gates"]) >= {"mismatches", "window_pass"}


def test_disconnect_cancels_the_generation(server):
    body = body_for("chat", "Write a very long story about a dragon.", method="ar", max_tokens=400,
                    ignore_eos=True, stream=True)
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        request_id = json.loads(first[len(b"data: "):])["id"]
        for _ in range(4):                      # a few tokens arrive, then the client goes away
            next(lines)
    t0 = time.time()

    def cancelled():
        for info in decoder_infos(4).values():
            last = info.get("last_cancelled")
            if last and last["request_id"] == request_id:
                return last
        return None

    last = wait_for(cancelled, 30, "the decoder to cancel the generation")
    assert last["tokens"] < 400
    assert time.time() - t0 < 30

    # Not streamed: the client stops waiting (its read timeout closes the connection).
    body = body_for("completion", "Write a very long story about a dragon.", method="ar", max_tokens=397,
                    ignore_eos=True)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/v1/completions", json=body, timeout=(10, 4))

    def cancelled_plain():
        return any((i.get("last_cancelled") or {}).get("max_tokens") == 397 for i in decoder_infos(4).values())

    wait_for(cancelled_plain, 30, "the decoder to cancel the non-streamed generation")


def test_overload_is_503_with_retry_after(server):
    # The decoder autoscales to 2 replicas (an earlier test's load may have left the second one
    # up): 2 x (2 slots + 4 in the replica's queue) + 4 at the caller = 16 requests can be held.
    # 24 answers long enough to stay in flight while the rest arrive overflow either way.
    body = body_for("completion", "Tell me a story.", method="ar", max_tokens=48, ignore_eos=True)
    results: list[requests.Response] = []
    lock = threading.Lock()

    def call():
        r = server.post("/v1/completions", body)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(r.status_code for r in results)
    assert len(results) == 24 and set(codes) <= {200, 503}, codes
    rejected = [r for r in results if r.status_code == 503]
    assert rejected, "24 concurrent requests against at most 16 held should overflow"
    for r in rejected:
        _assert_error(r, 503, None, "overloaded")
        assert r.headers["Retry-After"] == "2"
    for r in results:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 48


def test_autoscaling_up_and_down(server):
    wait_for(lambda: running_replicas("Decoder") == 1, 90, "the decoder to be back at 1 replica")
    stop = threading.Event()
    errors: list = []

    def load():
        body = body_for("completion", "Tell me a story about a cat.", method="ar", max_tokens=12, ignore_eos=True)
        while not stop.is_set():
            r = server.post("/v1/completions", body)
            if r.status_code not in (200, 503):
                errors.append(r.text)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: running_replicas("Decoder") == 2, 150, "the decoder to scale up to 2 replicas")
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert not errors, errors[:3]
    wait_for(lambda: running_replicas("Decoder") == 1, 120, "the decoder to scale back down to 1 replica")


def test_artifact_sources_match_the_datastore(target, stores, artifact):
    """The artifact loaded whole (decoder-held) and as two shards' parts (merged top-k) finds the
    datastore's neighbours with their payload; its REST index is loaded too."""
    import numpy as np

    from serving.config import IndexConfig
    from serving.index_data import load_shard_data, load_version_stores, merge_hits

    index = IndexConfig(version="art", uri=artifact)
    ds = stores["local"].dense
    rng = np.random.default_rng(0)
    q = ds.transform(rng.normal(size=(5, target.config.hidden_size)).astype(np.float32))
    sims, ids = ds.search(q, 10)
    stores = load_version_stores(index, target)
    whole = stores.dense
    assert len(whole) == len(ds)
    np.testing.assert_array_equal(whole.search(q, 10)[1], ids)
    parts = [load_shard_data(index, j, 2) for j in range(2)]
    assert [len(p.searchers) for p in parts] == [1, 1] and parts[0].meta.size == len(ds)
    merged = merge_hits([p.search(q, 10) for p in parts], 10)
    np.testing.assert_array_equal(merged.ids, ids)
    np.testing.assert_allclose(merged.sims, sims, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged.values, ds.values[ids])
    np.testing.assert_array_equal(merged.first, ds.first_token[ids])
    assert stores.sparse.n_tokens > 0


def test_index_hot_swap_keeps_requests_in_flight(server, target, stores, artifact):
    """A new index version (the artifact: dense shards and REST index) through the deployments'
    user_config while a request streams: new requests move to v2, the request in flight goes on
    (correct tokens, still on v1, no shard misses), and replicas are reconfigured in place."""
    new_index = {"version": "v2", "uri": artifact, "dense": "auto", "sparse": "auto"}
    body = body_for("chat", QUESTIONS[0], method="sense", budget=8, max_tokens=2000, ignore_eos=True, stream=True)
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=180) as r:
        lines = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith(b"data: "))
        events = [next(lines)]
        request_id = events[0]["id"]
        user_config = {"index": new_index}
        deployments = [{"name": "Decoder", "user_config": user_config}] + \
            [{"name": f"IndexShard{j}", "user_config": user_config} for j in range(2)]
        server.client.deploy_applications(serve_config(server.port, server.args, deployments))

        def on_v2():
            r2 = server.post("/v1/chat/completions", body_for("chat", QUESTIONS[1], method="sense", max_tokens=8))
            assert r2.status_code == 200, r2.text
            spec = r2.json()["speculative"]
            return spec if spec["index"]["version"] == "v2" else None

        spec = wait_for(on_v2, 120, "requests to use index version v2", every=1.0)
        assert spec["fallback"] is None and spec["index"]["searches"] > 0
        for _ in range(5):                     # the request in flight is still streaming
            events.append(next(lines))
    text, ids = stream_text(events, "chat")
    want = engine(target, stores, "chat", QUESTIONS[0], method="sense", max_tokens=len(ids))
    assert ids == want.token_ids and text == want.text[: len(text)]

    def finished():                            # our disconnect ended it: its statistics
        for info in decoder_infos(4).values():
            last = info.get("last_cancelled")
            if last and last["request_id"] == request_id:
                return info, last
        return None

    info, last = wait_for(finished, 30, "the in-flight request to end")
    old = last["speculative"]
    assert old["index"]["version"] == "v1" and old["fallback"] is None
    assert old["index"]["partial_searches"] == 0 and old["index"]["searches"] >= old["steps"] > 0
    # Reconfigured in place: the replica that served it is the same one, now on v2.
    assert info["index"]["version"] == "v2"
    wait_app_running(server.url)


def _kill_shard_replicas() -> int:
    import ray

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "IndexShard" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed += 1
    return killed


def test_shard_loss_falls_back_and_answers_correctly(server, target, stores):
    want = engine(target, stores, "chat", QUESTIONS[0], method="sense", max_tokens=48)
    body = body_for("chat", QUESTIONS[0], method="sense", budget=8, max_tokens=48, stream=True)
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=180) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert _kill_shard_replicas() == 2
        rest = [first] + list(lines)
    events = [json.loads(x[6:]) if x[6:] != b"[DONE]" else "[DONE]" for x in rest if x.startswith(b"data: ")]
    text, ids = stream_text(events, "chat")
    assert events[-1] == "[DONE]" and ids == want.token_ids and text == want.text
    spec = events[-2]["speculative"]
    assert spec["fallback"] is not None and spec["fallback"]["method"] == "pld", spec
    assert "unavailable" in spec["fallback"]["reason"]

    # While the shards come back, requests keep completing correctly (falling back if needed).
    want = engine(target, stores, "chat", QUESTIONS[1], method="sense", max_tokens=16)
    r = server.post("/v1/chat/completions", body_for("chat", QUESTIONS[1], method="sense", budget=8, max_tokens=16))
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want.token_ids
    wait_app_running(server.url, 180)          # Serve replaced the dead replicas


def test_prometheus_metrics(server):
    import ray

    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}

    def scrape():
        text = ""
        for p in ports:
            try:
                text += requests.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text
            except requests.RequestException:
                pass
        needed = ("ray_sense_requests_total{", "ray_sense_request_latency_seconds_bucket{",
                  "ray_sense_generated_tokens_total{", "ray_sense_mat_bucket{", "ray_sense_acceptance_rate_bucket{",
                  "ray_sense_index_searches_total{", "ray_sense_batch_rows_bucket{", "ray_sense_batch_requests_bucket{",
                  "ray_sense_batch_forwards_total{", "ray_sense_cached_prompt_tokens_total{")
        return text if all(n in text for n in needed) else None

    text = wait_for(scrape, 90, "the sense_* metrics on the nodes' Prometheus endpoints", every=2)
    assert 'method="sense"' in text and 'route="/v1/chat/completions"' in text
