"""Serving building blocks without Ray: the engine's streaming/cancel hooks, incremental text,
request validation, configuration, shard slicing and top-k merging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from decoding.config import SamplingParams
from decoding.drafters import PromptLookupDrafter
from decoding.engine import encode_prompt, generate
from serving.config import ServingConfig
from serving.errors import APIError
from serving.text import TextStream

# -- engine hooks ------------------------------------------------------------------------------


def test_on_tokens_concatenate_to_the_output(target):
    ids = encode_prompt(target, "Repeat exactly: the cat sat on the mat. the cat sat on the mat.")
    seen: list[list[int]] = []
    p = SamplingParams(max_new_tokens=24)
    r = generate(target, ids, params=p, drafter=PromptLookupDrafter(), budget=8, on_tokens=seen.append)
    plain = generate(target, ids, params=p, drafter=PromptLookupDrafter(), budget=8)
    assert [t for chunk in seen for t in chunk] == r.token_ids == plain.token_ids
    assert len(seen) == r.stats.steps + 1 and all(seen)      # the prefill's token, then one call per step


def test_on_tokens_respect_stop_strings(target):
    ids = encode_prompt(target, "Count from 1 to 20, separated by commas.")
    seen: list[int] = []
    r = generate(target, ids, params=SamplingParams(max_new_tokens=20, stop=("3",)), on_tokens=seen.extend)
    assert seen == r.token_ids and r.finish_reason == "stop" and "3" not in r.text


def test_should_stop_cancels(target):
    ids = encode_prompt(target, "Write a long story about a dragon.")
    full = generate(target, ids, params=SamplingParams(max_new_tokens=12))
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) > 3                      # prefill check + 2 steps pass, then stop

    r = generate(target, ids, params=SamplingParams(max_new_tokens=12), should_stop=stop_after_three)
    assert r.finish_reason == "cancelled" and r.stats.steps == 2
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and 0 < len(r.token_ids) < 12
    first = generate(target, ids, params=SamplingParams(max_new_tokens=12), should_stop=lambda: True)
    assert first.token_ids == [] and first.finish_reason == "cancelled"


# -- incremental text --------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,stop", [
    ("Count from 1 to 20, separated by commas.", (", 1", "9,")),
    ("Reply with three emoji about the sea and nothing else.", ()),
    ("Say hello in Japanese, Chinese and Russian.", ("!",)),
])
def test_stream_text_equals_final_text(target, prompt, stop):
    ids = encode_prompt(target, prompt)
    stream = TextStream(target.tokenizer, stop)
    deltas: list[str] = []
    r = generate(target, ids, params=SamplingParams(max_new_tokens=24, stop=stop), drafter=PromptLookupDrafter(),
                 budget=8, on_tokens=lambda new: deltas.append(stream.push(new)))
    deltas.append(stream.finish(r.text))
    assert "".join(deltas) == r.text
    assert "\ufffd" not in "".join(deltas[:-1]) or "\ufffd" in r.text


def test_stream_text_holds_back_a_possible_stop_string():
    class Chars:                                   # a tokenizer whose tokens are characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    s = TextStream(Chars(), ("STOP",))
    assert s.push([ord(c) for c in "abc S"]) == "abc "        # "S" may start "STOP"
    assert s.push([ord("T")]) == ""
    assert s.push([ord("x")]) == "STx"                        # it did not
    assert s.push([ord(c) for c in "yzSTOPtail"]) == "yz"     # cut at the stop string
    assert s.finish("abc STxyz") == ""


# -- requests ----------------------------------------------------------------------------------


def _err(fn) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    return info.value


def test_the_index_fallback_drafter_keeps_its_primarys_hidden_state_and_falls_back_exactly(target, dense_store_dir):
    """The served drafter over the sharded index (``FallbackDrafter``) lets the dense drafter keep
    the last state it observed, as the drafter alone does (the engine then copies none a step);
    when the index fails mid-request the rest drafts with prompt lookup, and the answer is plain
    decoding's either way."""
    from decoding.methods import Datastores, make_drafter
    from decoding.stores import load_datastores
    from serving.drafting import FallbackDrafter

    class Store:
        failure = None

    stores = Datastores(dense=load_datastores(target, dense=str(dense_store_dir), methods=["sense"]).dense)
    prompt = encode_prompt(target, "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                   "clips in May. How many clips did Natalia sell altogether in April and May?")
    params = SamplingParams(max_new_tokens=40)
    ar = generate(target, prompt, params=params).token_ids
    store = Store()
    steady = FallbackDrafter(make_drafter("sense", stores), store)
    assert steady.keeps_hidden and steady.needs_hidden
    # Soft verification's cosine stand-in reads the store's key transform through the wrapper (it
    # read none: served over index shards, the gate never fired).
    from decoding.config import SoftGateConfig
    from decoding.engine import Sequence

    assert steady.transform is stores.dense.transform is not None
    assert Sequence(target, prompt, params=params, drafter=steady, soft=SoftGateConfig()).verifier.transform \
        is stores.dense.transform
    assert generate(target, prompt, params=params, drafter=steady, budget=4).token_ids == ar
    assert steady.report() is None

    failing = FallbackDrafter(make_drafter("sense", stores), Store())
    search = failing.primary.anchored_chains

    def fail_on_the_fifth(*args, **kwargs):
        if failing.steps == 5:
            failing.store.failure = "shard 0 is down"
        return search(*args, **kwargs)

    failing.primary.anchored_chains = fail_on_the_fifth
    out = generate(target, prompt, params=params, drafter=failing, budget=4)
    assert out.token_ids == ar and failing.report() == {"method": "pld", "reason": "index shards unavailable: "
                                                        "shard 0 is down", "from_step": 5}


def test_request_validation_names_the_parameter():
    from serving import protocol as p

    cfg = ServingConfig()

    def chat(body: dict):
        return p.chat_request(p.parse(p.ChatRequest, json.dumps(body).encode()), cfg)

    msgs = [{"role": "user", "content": "hi"}]
    ok = chat({"messages": msgs, "max_tokens": 5, "temperature": 0, "speculative": {"method": "pld", "budget": 8}})
    assert ok.method == "pld" and ok.budget == 8 and ok.params.max_new_tokens == 5 and ok.params.greedy
    assert ok.prediction is None
    assert chat({"messages": msgs, "prediction": {"type": "content", "content": "def f(): pass"}}).prediction \
        == "def f(): pass"
    parts = [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]
    assert chat({"messages": msgs, "prediction": {"type": "content", "content": parts}}).prediction == "a b"
    assert ok.logprobs is None
    adjusted = chat({"messages": msgs, "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"7": -100},
                     "n": 3, "seed": 5, "temperature": 1})
    assert (adjusted.params.presence_penalty, adjusted.params.frequency_penalty) == (0.5, -1)
    assert adjusted.params.logit_bias == ((7, -100.0),) and adjusted.n == 3
    assert [(g.index, g.params.seed) for g in p.choices(adjusted)] == [(0, 5), (1, 6), (2, 7)]
    assert p.choices(ok) == [ok]
    assert ok.grammar is None and chat({"messages": msgs, "response_format": {"type": "text"}}).grammar is None
    assert chat({"messages": msgs, "response_format": {"type": "json_object"}}).grammar.description == "a JSON object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert "thing" in chat({"messages": msgs, "response_format": fmt}).grammar.description
    assert chat({"messages": msgs, "logprobs": True}).logprobs == 0
    assert chat({"messages": msgs, "logprobs": True, "top_logprobs": 5}).logprobs == 5
    assert p.completion_request(p.parse(p.CompletionRequest, b'{"prompt": "a", "logprobs": 3}'), cfg).logprobs == 3
    cases = [
        (json.dumps({"messages": msgs, "top_logprobs": 2}).encode(), "top_logprobs", None),
        (json.dumps({"messages": msgs, "logprobs": True, "top_logprobs": 21}).encode(), "top_logprobs", None),
        (json.dumps({"messages": msgs, "prediction": {"type": "text", "content": "x"}}).encode(), "prediction.type",
         None),
        (json.dumps({"messages": msgs, "prediction": {"content": "x"}}).encode(), "prediction.type", None),
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, None),
        (json.dumps({"messages": msgs, "bogus": 1}).encode(), "bogus", "unknown_parameter"),
        (json.dumps({"messages": msgs, "temperature": 7}).encode(), "temperature", None),
        (json.dumps({"messages": msgs, "max_tokens": 0}).encode(), "max_tokens", None),
        (json.dumps({"messages": msgs, "max_tokens": "5"}).encode(), "max_tokens", None),
        (json.dumps({"messages": msgs, "top_p": 0}).encode(), "top_p", None),
        (json.dumps({"messages": msgs, "n": 9}).encode(), "n", None),
        (json.dumps({"messages": msgs, "n": 0}).encode(), "n", None),
        (json.dumps({"messages": msgs, "logit_bias": {"a": 1}}).encode(), "logit_bias", None),
        (json.dumps({"messages": msgs, "logit_bias": {"5": -101}}).encode(), "logit_bias.5", None),
        (json.dumps({"messages": msgs, "presence_penalty": -3}).encode(), "presence_penalty", None),
        (json.dumps({"messages": msgs, "response_format": {"type": "yaml"}}).encode(), "response_format.type", None),
        (json.dumps({"messages": msgs, "response_format": {"type": "json_schema"}}).encode(),
         "response_format.json_schema", None),
        (json.dumps({"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "bogus"}}}}).encode(), "response_format", None),
        (json.dumps({"messages": msgs, "response_format": {"type": "json_object"}, "ignore_eos": True}).encode(),
         "ignore_eos", None),
        (json.dumps({"messages": msgs, "speculative": {"method": "magic"}}).encode(), "speculative.method", None),
        (json.dumps({"messages": msgs, "speculative": {"budget": 0}}).encode(), "speculative.budget", None),
        (json.dumps({"messages": msgs, "speculative": {"verification": "soft", "soft": {"lam": 3}}}).encode(),
         "speculative.soft.lam", None),
        (json.dumps({"messages": []}).encode(), "messages", None),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "messages.0.role", None),
        (json.dumps({"messages": msgs, "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop", None),
    ]
    for raw, param, code in cases:
        e = _err(lambda: p.chat_request(p.parse(p.ChatRequest, raw), cfg))
        assert e.status == 400 and e.type == "invalid_request_error", raw
        assert e.param == param, (raw, e.param, e.message)
        if code:
            assert e.code == code, (raw, e.code)
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    e = _err(lambda: chat({"messages": msgs, "model": "gpt-9"}))
    assert e.status == 404 and e.code == "model_not_found"


def test_the_served_model_is_named_after_the_model_it_serves():
    """Without model.name, clients address the model by its own name: a hub id as given, a local
    directory's or GGUF file's name, the embedded default's; an explicit name wins."""
    from serving import protocol as p

    named = {None: "smollm2-135m-instruct", "Qwen/Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
             "/models/qwen2-0.5b/": "qwen2-0.5b", "./my-model": "my-model", "my-model": "my-model",
             "/models/qwen2-0.5b-instruct-q8_0.gguf": "qwen2-0.5b-instruct-q8_0",
             "org/model.Q4_K_M.gguf": "model.Q4_K_M", "~/ckpt/llama": "llama", "C:\\models\\phi3": "phi3"}
    for path, name in named.items():
        assert ServingConfig.from_args({"model": {"path": path}}).model.name == name, path
    assert ServingConfig.from_args({"model": {"path": "/m/x", "name": "mine"}}).model.name == "mine"
    cfg = ServingConfig.from_args({"model": {"path": "/models/qwen2-0.5b"}})
    msgs = [{"role": "user", "content": "hi"}]
    p.chat_request(p.parse(p.ChatRequest, json.dumps({"messages": msgs, "model": "qwen2-0.5b"}).encode()), cfg)
    e = _err(lambda: p.chat_request(p.parse(p.ChatRequest, json.dumps(
        {"messages": msgs, "model": "smollm2-135m-instruct"}).encode()), cfg))
    assert e.status == 404 and "qwen2-0.5b" in e.message


def test_the_ingress_warm_up_sends_the_decoder_a_request_and_survives_its_absence(caplog):
    """At its start the ingress validates a body and makes one streaming call to the decoder's
    `ping` with the request it gives; a decoder that cannot be reached only logs."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from serving.config import ServingConfig
    from serving.ingress import Ingress
    from serving.protocol import GenerationRequest

    class Decoder:
        def __init__(self, fail: bool) -> None:
            self.fail, self.sent, self.ping = fail, [], self

        def options(self, **kw):
            assert kw == {"stream": True}
            return self

        def remote(self, req):
            self.sent.append(req)
            if self.fail:
                raise RuntimeError("no decoder replica")

            async def events():
                yield {"type": "pong"}
            return events()

    serve_log = logging.getLogger("ray.serve")        # Serve's logger does not propagate to the root
    serve_log.addHandler(caplog.handler)
    try:
        for fail in (False, True):
            decoder = Decoder(fail)
            with caplog.at_level(logging.INFO, logger="ray.serve"):
                asyncio.run(Ingress.func_or_class._warm_up(SimpleNamespace(cfg=ServingConfig(), decoder=decoder)))
            (req,) = decoder.sent
            assert isinstance(req, GenerationRequest) and req.kind == "chat", req
    finally:
        serve_log.removeHandler(caplog.handler)
    assert "ingress warm-up failed (RuntimeError)" in caplog.text


def test_the_ingress_request_path_loads_no_torch():
    """The ingress validates requests without torch: importing it there made the first request
    after a start wait ~1 s (and each ingress replica hold torch's memory)."""
    import subprocess
    import sys

    code = """if True:
        import json, sys
        import serving.ingress
        from serving import protocol as p
        from serving.config import ServingConfig
        cfg = ServingConfig()
        soft = {"verification": "soft", "soft": {"lam": 0.4}}
        p.chat_request(p.parse(p.ChatRequest, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                           "speculative": soft}).encode()), cfg)
        p.completion_request(p.parse(p.CompletionRequest, json.dumps({"prompt": "hi", "stop": ["x"]}).encode()), cfg)
        print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
    """
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch" not in res.stdout and "transformers" not in res.stdout, res.stdout


def test_completion_prompt_forms():
    from serving import protocol as p

    cfg = ServingConfig()

    def comp(body: dict):
        return p.completion_request(p.parse(p.CompletionRequest, json.dumps(body).encode()), cfg)

    assert comp({"prompt": "abc"}).prompt == "abc"
    assert comp({"prompt": ["abc"]}).prompt == "abc"
    assert comp({"prompt": [1, 2, 3]}).prompt_ids == [1, 2, 3]
    assert comp({"prompt": "x"}).params.max_new_tokens == 16          # OpenAI's default
    assert _err(lambda: comp({"prompt": ["a", "b"]})).param == "prompt"
    assert comp({"prompt": "a", "echo": True}).echo and not comp({"prompt": "a"}).echo
    assert comp({"prompt": "a", "echo": True, "stream": True}).echo
    assert comp({"prompt": "a", "logprobs": 2}).logprobs == 2
    assert _err(lambda: comp({"prompt": "a", "logprobs": 21})).param == "logprobs"
    assert _err(lambda: comp({})).code == "missing_required_parameter"


# -- configuration -----------------------------------------------------------------------------


def test_config_is_typed_and_strict():
    from pydantic import ValidationError

    cfg = ServingConfig.from_args({"shards": {"num_shards": 2}, "index": {"dense": "/x", "version": "v7"}})
    assert cfg.sharded and "index" not in cfg.static()
    assert cfg.index.user_config()["index"]["version"] == "v7"
    for bad in ({"nope": 1}, {"decoder": {"max_ongoing_requests": 0}},
                {"decoder": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}},
                {"speculative": {"method": "magic"}}, {"index": {"dense": "artifact"}},
                {"ingress": {"overload_status": 500}}):
        with pytest.raises(ValidationError):
            ServingConfig.from_args(bad)
    # Changing only the index keeps the deployments' constructor arguments identical.
    a = ServingConfig.from_args({"index": {"version": "a"}})
    b = ServingConfig.from_args({"index": {"version": "b", "dense": "/y"}})
    assert a.static() == b.static() and a.index.key() != b.index.key()


def test_a_local_ray_instance_has_the_cpus_the_apps_replicas_ask_for():
    """On a 2-core machine two index shards (0.5 CPU each) beside the decoder (1) and the ingress
    (0.1) were never all placed and serving.run waited forever: the local instance gets the CPUs
    the replicas ask for at start when the cores are fewer."""
    from serving.run import local_ray_cpus

    def cpus(args: dict, cores: int = 2) -> int:
        return local_ray_cpus(ServingConfig.from_args(args), cores)

    assert cpus({}) == 2 and cpus({}, cores=16) == 16                            # 1.1 asked: the cores
    assert cpus({"shards": {"num_shards": 2}}) == 3                                 # 1 + 0.1 + 2 x 0.5
    assert cpus({"shards": {"num_shards": 4, "num_replicas": 2}}) == 6              # 1 + 0.1 + 8 x 0.5
    assert cpus({"decoder": {"num_replicas": 3}}) == 4
    assert cpus({"decoder": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}}}) == 3
    assert cpus({"decoder": {"ray_actor_options": {"num_cpus": 4}}}) == 5


def test_serving_run_names_each_configuration_problem_in_one_line():
    """A bad configuration stops `python -m serving.run` before Ray starts, with one line naming
    every problem by its dotted path: no traceback."""

    from support.module_run import run_reporting_imports

    res = run_reporting_imports("serving.run", "--set", "decoder.queued_in_replica=-1", "--set", "decoder.nope=3")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 2, res.stderr[-2000:]
    assert lines[1] == "imported: []"           # answered before Ray, torch or transformers is imported
    assert lines[0].startswith("error: bad configuration: ")
    assert "decoder.queued_in_replica: Input should be greater than or equal to 0" in lines[0]
    assert "decoder.nope: Extra inputs are not permitted" in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["--config", "/nonexistent/sense.yaml"], "error: /nonexistent/sense.yaml: No such file or directory"),
    (["--set", "index.dense=/nonexistent/store", "--set", "index.sparse=null"],
     "error: bad configuration: index.dense: /nonexistent/store does not exist"),
    (["--set", "decoder"], "error: --set expects key=value, got 'decoder'"),
    (["--set", "model.path=/nonexistent/model"], "error: bad configuration: model.path: /nonexistent/model does not exist"),
    pytest.param(["--set", "model.device=cuda"], "error: bad configuration: model.device: device 'cuda': torch "
                 f"{torch.__version__} (a CPU-only build) finds no CUDA device here; use the cpu device",
                 marks=pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")),
    pytest.param(["--set", "decoder.ray_actor_options.num_gpus=1"], "error: bad configuration: "
                 "decoder.ray_actor_options.num_gpus: device 'cuda': torch "
                 f"{torch.__version__} (a CPU-only build) finds no CUDA device here; use the cpu device",
                 marks=pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")),
])
def test_serving_run_stops_on_what_it_cannot_read_in_one_line(argv, message):
    """A missing config file, a local index path that is not there, a malformed override: one
    line before Ray starts, no traceback."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "serving.run", *argv], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and lines == [message], res.stderr[-2000:]


def test_serving_run_stops_on_a_model_it_cannot_load_in_one_line():
    """A hub id that cannot be fetched (offline) while the default datastores are prepared: the
    loader's one line after the progress line, before Ray starts, no traceback."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "serving.run", "--set", "model.path=nobody/no-such-model"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[-1].startswith("error: could not load model 'nobody/no-such-model'"), res.stderr[-2000:]


def test_a_failed_deployment_is_named_by_its_replicas_last_line(monkeypatch):
    """serving.run's one-line reason for an application that did not start: each failed
    deployment's last line of Serve's message (the replica's exception), without its module path."""
    from types import SimpleNamespace

    from ray import serve

    from serving.run import deploy_failure

    trace = ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
             'index.dense_format.DatastoreError: /s/manifest.json: format version None, this code reads 1')
    status = SimpleNamespace(applications={"sense": SimpleNamespace(deployments={
        "Ingress": SimpleNamespace(status="DeploymentStatus.HEALTHY", message=""),
        "Decoder": SimpleNamespace(status="DeploymentStatus.DEPLOY_FAILED", message=trace)})})
    monkeypatch.setattr(serve, "status", lambda: status)
    assert deploy_failure("sense") == "Decoder: DatastoreError: /s/manifest.json: format version None, this code reads 1"
    assert deploy_failure("other") is None


def test_build_app_reads_dotted_cli_args():
    from serving.config import nest_dotted

    assert nest_dotted({"shards.num_shards": "2", "index.dense": "null", "speculative.method": "pld"}) == {
        "shards": {"num_shards": 2}, "index": {"dense": None}, "speculative": {"method": "pld"}}


def test_a_batching_replica_takes_its_queue_beside_the_batch():
    """With batching, Serve sends a decoder replica its batch (max_ongoing_requests, the
    scheduler's limit) and queued_in_replica more, which wait in its scheduler; without batching,
    the batch limit alone."""
    from serving.app import build_app
    from serving.config import DecoderConfig

    def serve_limit(decoder: dict) -> int:
        app = build_app({"decoder": decoder})
        return app._bound_deployment.init_args[1]._bound_deployment._deployment_config.max_ongoing_requests

    assert serve_limit({"max_ongoing_requests": 8, "queued_in_replica": 3}) == 11
    assert serve_limit({"max_ongoing_requests": 8, "queued_in_replica": 0}) == 8
    assert serve_limit({"max_ongoing_requests": 8, "queued_in_replica": 3, "batching": False}) == 8
    assert DecoderConfig(max_ongoing_requests=16).replica_capacity == 16 + DecoderConfig().queued_in_replica


# -- shards and merging ------------------------------------------------------------------------


def _toy_store(e=500, d=16, n=6, seed=0):
    from index.dense_format import KeyTransform, Manifest, ModelFingerprint
    from index.dense_store import DenseStore

    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(e, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.integers(0, 1000, size=(e, n)).astype(np.int32)
    manifest = Manifest(fingerprint=ModelFingerprint("toy", "w", "t", -1), key_dim=d, value_len=n, eos_token_id=2,
                        entries=e)
    transform = KeyTransform(np.zeros(d, np.float32), np.ones(d, np.float32), np.eye(d, dtype=np.float32))
    return DenseStore(manifest=manifest, transform=transform, keys=keys, values=values, first_token=values[:, 0])


def test_shard_slices_merge_to_the_whole_store():
    from serving.index_data import IndexMeta, ShardData, _RowRange, merge_hits

    store = _toy_store()
    q = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    want_sims, want_ids = store.search(q, 10)
    meta = IndexMeta("k", "v", "toy", 16, 6, 2, len(store), store.transform)
    for n_shards in (1, 2, 3):
        bounds = [len(store) * j // n_shards for j in range(n_shards + 1)]
        parts = [ShardData(meta, [_RowRange(store.keys[lo:hi], lo, None)], store.values, store.first_token)
                 .search(q, 10) for lo, hi in zip(bounds, bounds[1:])]
        merged = merge_hits(parts, 10)
        assert np.array_equal(merged.ids, want_ids)
        np.testing.assert_allclose(merged.sims, want_sims, rtol=1e-5)
        assert np.array_equal(merged.values, store.values[want_ids])
        assert np.array_equal(merged.first, store.first_token[want_ids])


def test_merge_pads_missing_neighbours():
    from serving.index_data import Hits, merge_hits

    a = Hits(np.array([[0.9, -np.inf]], np.float32), np.array([[5, -1]]), np.array([[1, 0]], np.int32),
             np.zeros((1, 2, 3), np.int32))
    m = merge_hits([a, Hits.empty(1, 2, 3)], 3)
    assert m.ids.tolist() == [[5, -1, -1]] and m.sims[0, 0] == np.float32(0.9)


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_generations_share_one_model(target):
    """Requests in one decoder replica run in threads over one model: each keeps its own KV cache
    and drafter, with the forward lock (the default) and without it."""
    import threading

    from serving.shared_target import SerializedTarget

    prompts = ["Repeat exactly: one two three, one two three.", "What is 2+3?", "Name three colours."]
    p = SamplingParams(max_new_tokens=10)
    ids = [encode_prompt(target, q) for q in prompts]
    want = [generate(target, i, params=p, drafter=PromptLookupDrafter(), budget=8).token_ids for i in ids]
    for model in (SerializedTarget(target), SerializedTarget(target, serialize=False)):
        got: list = [None] * len(ids)

        def run(k: int) -> None:
            got[k] = generate(model, ids[k], params=p, drafter=PromptLookupDrafter(), budget=8).token_ids

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want


def test_stream_deltas_waiting_together_go_as_one_chunk():
    import asyncio

    from serving.stream_events import coalesce_deltas

    q: asyncio.Queue = asyncio.Queue()
    for e in ({"type": "delta", "token_ids": [2]}, {"type": "delta", "token_ids": [3]},
              {"type": "done", "text": ""}, {"type": "delta", "token_ids": [9]}):
        q.put_nowait(e)
    event, held = coalesce_deltas({"type": "delta", "token_ids": [1]}, q)
    assert event == {"type": "delta", "token_ids": [1, 2, 3]}           # text is decoded per chunk later
    assert held == {"type": "done", "text": ""} and q.qsize() == 1        # order kept, nothing after "done" read
    start = {"type": "start", "prompt_tokens": 3}
    assert coalesce_deltas(start, q) == (start, None) and q.qsize() == 1   # only deltas merge
    empty: asyncio.Queue = asyncio.Queue()
    one = {"type": "delta", "token_ids": [5]}
    assert coalesce_deltas(one, empty) == (one, None)                     # nothing waiting: sent as is


def test_the_last_tokens_go_inside_the_finish_event():
    """relay(): deltas waiting together are one item with their text; the last delta, when the
    finish is already behind it, goes inside the done event (one item through Ray instead of
    two), the text of both still what the request wrote; a delta with nothing behind it goes as
    is, and a done event alone keeps no delta."""
    import asyncio

    from serving.stream_events import relay

    class Chars:                                   # a tokenizer whose tokens are characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    def codes(text):
        return [ord(c) for c in text]

    q: asyncio.Queue = asyncio.Queue()
    text = TextStream(Chars(), ())
    event, held = relay({"type": "delta", "token_ids": codes("ab")}, q, text)
    assert event == {"type": "delta", "token_ids": codes("ab"), "text": "ab"} and held is None
    for e in ({"type": "delta", "token_ids": codes("d")}, {"type": "done", "text": "abcd", "finish_reason": "length"}):
        q.put_nowait(e)
    event, held = relay({"type": "delta", "token_ids": codes("c")}, q, text)
    assert held is None and q.empty()
    assert event == {"type": "done", "text": "", "finish_reason": "length",
                     "delta": {"type": "delta", "token_ids": codes("cd"), "text": "cd"}}
    alone = TextStream(Chars(), ())
    done = {"type": "done", "text": "xy"}
    assert relay(done, asyncio.Queue(), alone)[0] == {"type": "done", "text": "xy"}     # nothing streamed: all of it
    assert relay(done, asyncio.Queue(), None) == (done, None)                           # a plain request


def test_stream_buffer_sends_the_first_tokens_at_once_then_at_most_every_interval():
    from serving.stream_events import StreamBuffer

    now = [0.0]
    sent: list[dict] = []
    buf = StreamBuffer(sent.append, 0.1, clock=lambda: now[0])
    buf.push([1])                                   # the first tokens: at once
    for t, ids in ((0.03, [2]), (0.06, [3, 4]), (0.11, [5]), (0.15, [6])):
        now[0] = t
        buf.push(ids)
    assert [e["token_ids"] for e in sent] == [[1], [2, 3, 4, 5]]     # 6 waits for the interval
    buf.flush()                                     # before the finish: the rest
    buf.flush()                                     # nothing left: nothing sent
    assert [e["token_ids"] for e in sent] == [[1], [2, 3, 4, 5], [6]]
    every = StreamBuffer(sent.append, 0.0, clock=lambda: now[0])       # interval 0: one chunk a step
    every.push([7])
    every.push([8])
    assert [e["token_ids"] for e in sent[-2:]] == [[7], [8]]
    assert all("logprobs" not in e for e in sent)
    # With logprobs: each chunk carries its own tokens' records, however the tokens were gathered.
    records: list = []
    sent.clear()
    buf = StreamBuffer(sent.append, 0.1, clock=lambda: now[0], logprobs=records)
    for t, ids in ((1.0, [1]), (1.03, [2, 3]), (1.05, [4]), (1.2, [5])):
        now[0] = t
        records += [f"r{i}" for i in ids]          # the engine appends before it calls the hook
        buf.push(ids)
    buf.flush()
    assert [(e["token_ids"], e["logprobs"]) for e in sent] == [([1], ["r1"]), ([2, 3, 4, 5], ["r2", "r3", "r4", "r5"])]


def test_logprobs_take_openai_shapes():
    from decoding.engine import TokenLogprob
    from serving import logprobs, protocol
    from serving.stream_events import _merge
    from serving.responses import chunk, full_body

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return {1: " Par", 2: "is", 3: "é", 4: "<eos>"}[ids[0]]

    texts = logprobs.TokenTexts(Tok())
    entries = logprobs.entries(texts, [TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.5)]), TokenLogprob(3, -0.25, [])])
    par = {"token": " Par", "logprob": -0.5, "bytes": [32, 80, 97, 114]}
    assert entries[0] == {**par, "top_logprobs": [par, {"token": "is", "logprob": -1.5, "bytes": [105, 115]}]}
    assert entries[1]["bytes"] == [195, 169] and entries[1]["top_logprobs"] == []
    assert logprobs.completion(entries, offset=3) == {"tokens": [" Par", "é"], "token_logprobs": [-0.5, -0.25],
                                                      "top_logprobs": [{" Par": -0.5, "is": -1.5}, {}],
                                                      "text_offset": [3, 7]}
    merged = _merge({"type": "delta", "token_ids": [1], "logprobs": ["a"]},
                    {"type": "delta", "token_ids": [2], "logprobs": ["b"]})
    assert merged == {"type": "delta", "token_ids": [1, 2], "logprobs": ["a", "b"]}
    cfg = ServingConfig()
    chat = protocol.chat_request(protocol.ChatRequest(messages=[{"role": "user", "content": "hi"}]), cfg)
    done = {"finish_reason": "stop", "usage": {}, "speculative": {}, "token_ids": [1, 3], "logprobs": entries}
    assert full_body(chat, "m", done, "x")["choices"][0]["logprobs"] == {"content": entries}
    assert chunk(chat, "m", text="x")["choices"][0]["logprobs"] is None
    comp = protocol.completion_request(protocol.CompletionRequest(prompt="hi", logprobs=1), cfg)
    assert chunk(comp, "m", text="x", logprobs=entries[1:], offset=4)["choices"][0]["logprobs"]["text_offset"] == [4]
    # echo: the prompt and its log-probabilities (none for its first token) before the answer's
    echo = protocol.completion_request(protocol.CompletionRequest(prompt="Par", logprobs=1, echo=True), cfg)
    first = {"token": "P", "logprob": None, "bytes": [80], "top_logprobs": None}
    body = full_body(echo, "m", {**done, "prompt_text": "Par", "prompt_logprobs": [first, entries[0]]}, "is")
    choice = body["choices"][0]
    assert choice["text"] == "Paris" and choice["logprobs"]["token_logprobs"] == [None, -0.5, -0.5, -0.25]
    assert choice["logprobs"]["top_logprobs"][0] is None and choice["logprobs"]["text_offset"] == [0, 1, 5, 9]


def test_a_busy_replica_streams_in_fewer_larger_chunks():
    """Each chunk costs CPU in the replica, the ingress, the proxy and the client: past
    ``stream_chunks_per_s`` together, each stream's interval grows with the streams; a function
    interval is asked at every push."""
    from serving.config import DecoderConfig
    from serving.stream_events import StreamBuffer, stream_interval

    assert DecoderConfig().stream_interval_ms == 250.0         # the default (see DecoderConfig)
    cfg = DecoderConfig(stream_interval_ms=100.0)
    assert stream_interval(cfg, 1) == stream_interval(cfg, 3) == cfg.stream_interval_ms / 1e3
    assert stream_interval(cfg, 16) == pytest.approx(16 / cfg.stream_chunks_per_s)
    assert stream_interval(cfg, 16) > stream_interval(cfg, 8) > stream_interval(cfg, 1)
    uncapped = DecoderConfig(stream_chunks_per_s=0)
    assert stream_interval(uncapped, 16) == uncapped.stream_interval_ms / 1e3
    now, streams, sent = [0.0], [1], []
    buf = StreamBuffer(sent.append, lambda: stream_interval(cfg, streams[0]), clock=lambda: now[0])
    buf.push([1])
    now[0] = 0.15
    buf.push([2])                                   # one stream: 100 ms passed, sent
    streams[0], now[0] = 16, 0.4
    buf.push([3])                                   # 16 streams: 533 ms not yet passed
    now[0] = 0.7
    buf.push([4])
    assert [e["token_ids"] for e in sent] == [[1], [2], [3, 4]]


def test_serving_run_gives_a_local_cpu_decoder_the_machines_cores(monkeypatch):
    import os

    from serving.run import local_torch_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert local_torch_threads(ServingConfig.from_args({})) == 8
    assert local_torch_threads(ServingConfig.from_args({"decoder": {"num_replicas": 2}})) == 4
    assert local_torch_threads(ServingConfig.from_args({"model": {"torch_threads": 3}})) is None
    assert local_torch_threads(ServingConfig.from_args({"model": {"device": "cuda"}})) is None
    assert local_torch_threads(ServingConfig.from_args(
        {"decoder": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}})) is None


def test_lean_control_plane_env_keeps_the_users_values():
    from serving.control_plane import LEAN_ENV, apply_lean_env, want_dashboard

    env = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
    applied = apply_lean_env(env)
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"          # the user's setting wins
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == LEAN_ENV["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]
    assert applied == {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
    assert apply_lean_env(env) == {}
    assert want_dashboard(None, cores=2) is False and want_dashboard(None, cores=16) is True
    assert want_dashboard(True, cores=2) is True and want_dashboard(False, cores=16) is False


@pytest.mark.slow
def test_a_local_instance_hands_the_lean_settings_to_its_workers():
    """The settings work only if the raylet's workers (controller, replicas) inherit them."""
    import subprocess
    import sys

    code = """
import os, ray
from serving.control_plane import LEAN_ENV, init_local_ray
os.environ.pop("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", None)
init_local_ray(dashboard=False, num_cpus=1, logging_level="ERROR", log_to_driver=False)
@ray.remote
def env():
    import ray.serve._private.constants as c
    return {k: os.environ.get(k) for k in LEAN_ENV}, c.CONTROL_LOOP_INTERVAL_S
seen, loop = ray.get(env.remote())
assert seen == LEAN_ENV, seen
assert loop == 1.0, loop
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_stopped_handle_polls_do_not_poll_into_a_shut_down_ray():
    """A driver that made a handle call stops its handles' long polls before `ray.shutdown()`
    (the main job does): a poll answered during the shutdown then does not poll again into a Ray
    that is gone (which printed a traceback at the end of the main job)."""
    import os
    import subprocess
    import sys

    code = """if True:
        import gc
        import ray
        from ray import serve
        from ray.serve._private.long_poll import LongPollClient
        from serving.app import stop_handle_polls

        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

        @serve.deployment
        def f():
            return 1

        serve.run(f.bind(), name="polls", route_prefix=None)
        assert serve.get_deployment_handle("f", app_name="polls").remote().result() == 1
        clients = [o for o in gc.get_objects() if type(o) is LongPollClient]
        assert clients
        import warnings
        import torch.distributed         # an object that warns when its class is read
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stop_handle_polls()
        assert not caught, [str(w.message) for w in caught]     # (the main job's last line)
        ray.shutdown()
        for c in clients:           # each one's pending poll answered after the shutdown
            c._poll_next()
        print("clean")
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}    # its own Ray, not the suite's
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env=env)
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr[-2000:]


def test_tools_become_plain_turns_a_grammar_and_calls():
    """Tool calling (serving/tools.py): the functions described in a system message, earlier calls
    and results as plain turns, a required or named call as a grammar, an answer parsed back."""
    from serving import protocol as p
    from serving.tools import parse_calls

    cfg = ServingConfig.from_args({})
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}
    clock = {"type": "function", "function": {"name": "get_time"}}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]

    def chat(body):
        return p.chat_request(p.parse(p.ChatRequest, json.dumps(body).encode()), cfg)

    auto = chat({"messages": msgs, "tools": [weather, clock]})
    assert auto.tool_names == ("get_weather", "get_time") and auto.grammar is None
    assert auto.messages[0]["role"] == "system" and "get_weather" in auto.messages[0]["content"]
    assert "answer normally" in auto.messages[0]["content"] and auto.messages[1] == msgs[0]
    required = chat({"messages": [{"role": "system", "content": "Be brief."}, *msgs], "tools": [weather, clock],
                     "tool_choice": "required"})
    assert required.grammar.description == "a call of one of the tools"
    assert required.messages[0]["content"].startswith("Be brief.\n\nYou can call these functions")
    named = chat({"messages": msgs, "tools": [weather, clock],
                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert "`get_weather`" in named.messages[0]["content"] and named.grammar is not None
    odd = {"type": "function", "function": {"name": "auto"}}     # a function named like a mode
    forced = chat({"messages": msgs, "tools": [weather, odd], "tool_choice": {"type": "function",
                                                                             "function": {"name": "auto"}}})
    assert forced.grammar is not None and "calling `auto`" in forced.messages[0]["content"]
    off = chat({"messages": msgs, "tools": [weather], "tool_choice": "none"})
    assert off.tool_names is None and off.messages == msgs
    turns = chat({"messages": [*msgs, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}], "tools": [weather]})
    assert turns.messages[2] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}
    assert turns.messages[3] == {"role": "user", "content": "Result of get_weather (call call_1):\n18 C, sunny"}
    for body, param in (({"messages": msgs, "tool_choice": "required"}, "tool_choice"),
                        ({"messages": msgs, "tools": [weather], "tool_choice": {"type": "function",
                                                                                "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"messages": msgs, "tools": [weather, weather]}, "tools"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages.0.tool_call_id"),
                        ({"messages": msgs, "tools": [weather], "tool_choice": "required",
                          "response_format": {"type": "json_object"}}, "tool_choice"),
                        ({"messages": msgs, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
                         "tools.0.function.name")):
        e = _err(lambda: chat(body))
        assert e.status == 400 and e.param == param, (body, e.param, e.message)

    names = {"get_weather", "get_time"}
    for text in ('{"name": "get_weather", "arguments": {"city": "Paris"}}',
                 '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'):
        calls = parse_calls(text, names)
        assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
            [("function", "get_weather", {"city": "Paris"})] and calls[0]["id"].startswith("call_")
    assert len(parse_calls('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": '
                           '{"city": "Rome"}}]', names)) == 2
    for text in ("It is sunny.", '{"name": "launch", "arguments": {}}', '{"name": "get_time", "arguments": 3}',
                 '{"name": "get_weather"', ""):
        assert parse_calls(text, names) is None, text


def test_serving_and_the_cli_default_to_the_same_demo_dense_store():
    """serving.config stays free of torch, so its default is a literal: it must be the CLI's."""
    from decoding.demo_stores import DEFAULT_DENSE_DOCS

    assert ServingConfig().index.dense_default_docs == DEFAULT_DENSE_DOCS
