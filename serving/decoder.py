"""The decoder deployment: the target model and the speculative decode loop.

Concurrency in a replica: up to ``max_ongoing_requests`` requests at once, each with its own
KV cache (``KVState``), drafter, verifier and budget; nothing mutable is shared between
requests. With batching, Serve sends a replica ``queued_in_replica`` more, which wait in the
scheduler's queue and join the batch at the step a running request ends. A request is prepared
(encoded, its drafter and budget chosen) in a worker thread.

- ``decoder.batching`` (the default): the replica's one batch loop
  (``decoding.scheduler.BatchLoop``) runs every admitted request's steps together: each step
  verifies all their draft trees in one forward, with draft budgets allocated across the batch
  for goodput. A request's output does not depend on what shares its batch (the batch-invariant
  lean forward). The worker thread waits for its request and relays the result.
- Without batching, each request runs ``decoding.engine.generate`` in its own thread, and with
  ``decoder.serialize_forward`` a per-replica lock lets one forward run at a time (on CPU,
  parallel forwards only fight over the same cores).

Events the ``generate`` stream yields (plain dicts): ``start`` (prompt accepted), ``delta``
(text and token ids committed since the last one, at most every ``decoder.stream_interval_ms``;
streaming requests only), then ``done`` (final text
tail, finish reason, usage and statistics; with the last ``delta`` inside it, as ``delta``, when
the two were ready together: one item through Ray instead of two) or a single ``error`` (an
APIError as a dict).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

# torch, the target model and the stores are imported inside the deployment's methods: this module
# is imported wherever the application is built (the driver, `serve run`, the ingress replica's
# process), and only the decoder replicas should pay for torch and transformers.
from serving.config import IndexConfig, ServingConfig
from serving.errors import APIError, from_sense_error, internal
from serving.shared_target import SerializedTarget
from serving.stream_events import StreamBuffer, relay, stream_interval

log = logging.getLogger("ray.serve")

COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class IndexState:
    """One loaded index version (replaced whole on a hot swap; requests keep theirs)."""

    config: IndexConfig
    sparse: object = None          # SparseIndex (held here in both modes)
    dense: object = None           # local mode: the whole dense store
    meta: object = None            # sharded mode: IndexMeta from the shards
    error: str | None = None       # sharded mode: why meta is missing
    retired: bool = False          # replaced by a newer version

    def describe(self, sharded: bool) -> dict:
        d = {"version": self.config.version, "key": self.config.key(), "mode": "sharded" if sharded else "local",
             "sparse": self.sparse is not None,
             "dense": (self.meta is not None) if sharded else (self.dense is not None)}
        if self.error:
            d["error"] = self.error
        return d


def _resolve_device(model_cfg) -> tuple[str, str]:
    import torch

    device = model_cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, model_cfg.dtype       # dtype "auto": measured at load (decoding.dtype_choice)


def _thread_settings() -> dict:
    """The replica's intra-op threads, for the log and GET /health. Ray sets OMP_NUM_THREADS to
    the actor's num_cpus, so torch gets that many unless model.torch_threads says otherwise
    (applied before this). FAISS has an OpenMP runtime of its own (faiss-cpu bundles libgomp)
    that reads OMP_NUM_THREADS at start and never torch's setting; a single-query search runs
    on one thread either way."""
    import os

    import torch

    return {"torch": torch.get_num_threads(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}


@serve.deployment
class Decoder:
    def __init__(self, static: dict, shards: list | None = None) -> None:
        import torch

        from decoding.compute_thread import ComputeThread
        from decoding.target import TargetModel
        from serving.metrics import DecoderMetrics
        from serving.remote_index import ShardClient

        self.cfg = ServingConfig.model_validate(static)
        # Every model computation of the replica (loading, measuring, forwards) runs on this one
        # thread: one OpenMP pool, so libgomp never throttles its workers (decoding/compute_thread.py).
        self.compute = ComputeThread("torch")
        if self.cfg.model.torch_threads:
            self.compute.call(torch.set_num_threads, self.cfg.model.torch_threads)
        device, dtype = _resolve_device(self.cfg.model)
        self.threads = self.compute.call(_thread_settings)
        self.target = self.compute.call(TargetModel.load, self.cfg.model.path, dtype=dtype, device=device,
                                        prefix_cache_mb=self.cfg.model.prefix_cache_mb)
        self.model = SerializedTarget(self.target, serialize=self.cfg.decoder.serialize_forward, compute=self.compute)
        if self.cfg.decoder.batching:
            from decoding.scheduler import BatchLoop

            self.batch = BatchLoop(self.model, max_batch=self.cfg.decoder.max_ongoing_requests,
                                   prefill_tokens=self.cfg.decoder.prefill_tokens_per_step,
                                   prefill_prompts=self.cfg.decoder.prefill_prompts_per_step, compute=self.compute)
        else:
            self.batch = None
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.decoder.replica_capacity + 2,
                                       thread_name_prefix="generate")
        sh = self.cfg.shards
        self.client = ShardClient(shards, timeout_s=sh.search_timeout_s, cooldown_s=sh.cooldown_s) if shards else None
        self.index: IndexState | None = None
        self._pending: IndexState | None = None     # a new version waiting for the shards
        self.index_error: str | None = None
        self._cost = None
        self._cost_lock = threading.Lock()
        self._reconfigure_lock = asyncio.Lock()
        self.counts = {"active": 0, "completed": 0, "cancelled": 0, "errors": 0, "fallbacks": 0}
        self._token_texts = None        # serving.logprobs.TokenTexts, on the first request with logprobs
        self._counts_lock = threading.Lock()
        self.last_cancelled: dict | None = None
        self.metrics = DecoderMetrics()
        if self.batch is not None:
            self.batch.on_step = self.metrics.batch_step
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = "local"
        # The cost curve the adaptive budget plans with, and with batching the batched forward's
        # cost model: measured before any request runs (once per machine, model and dtype; then
        # read from the cache), so no request waits on them.
        self._cost_curve()
        if self.batch is not None:
            from decoding.cost import batch_cost

            self.compute.call(batch_cost, self.target)
        self._warm_up()
        log.info("decoder ready: %s on %s/%s, %s index, threads %s", self.cfg.model.name, device,
                 self.target.dtype_choice.reason,
                 "sharded" if self.client else "local", self.threads)

    def _warm_up(self) -> None:
        """One short chat answer before the replica takes requests, so that its first request
        does not pay the process's first chat template, draft tree and dense drafter (measured on
        the 2-core EPYC: its encoding 5-7 ms against 0.5 later, its drafter 21 ms against 0.2).
        It runs outside the batch loop, with a fixed budget, so no statistic or learned estimate
        of the replica counts it; its prompt stays in the prefix cache (the chat template's
        system turn, which the first chat request then shares, as later ones share it anyway),
        and the cache's counters start from zero after it."""
        from decoding.config import SamplingParams
        from decoding.engine import Sequence, encode_prompt
        from decoding.errors import one_line
        from decoding.helper_threads import single_threaded_blas
        from decoding.methods import make_drafter
        from serving.text import TextStream

        t0 = time.perf_counter()
        single_threaded_blas()      # a dense drafter's first call: ~20 ms (threadpoolctl reads the libraries)
        try:
            ids = encode_prompt(self.model, "Say hello.", chat=True)
            seq = Sequence(self.model, ids, params=SamplingParams(max_new_tokens=8, ignore_eos=True),
                           drafter=make_drafter("pld"), budget=2)
            result = seq.run(self.compute.call)
            TextStream(self.model.tokenizer).push(list(result.token_ids))
        except Exception as exc:    # a model whose context cannot hold the prompt, say: requests will tell
            log.warning("decoder warm-up skipped: %s: %s", type(exc).__name__, one_line(exc))
            return
        finally:
            if self.target.prefix_cache is not None:
                self.target.prefix_cache.reset_counters()
        log.info("decoder warmed up in %.0f ms", 1e3 * (time.perf_counter() - t0))

    # -- index versions -----------------------------------------------------------------------

    async def reconfigure(self, user_config: dict) -> None:
        """A new index version: load it beside the current one, then swap (requests in flight
        keep the stores they started with). Sharded: the swap waits until the shards hold the
        new version; meanwhile the current one keeps serving."""
        index = IndexConfig.from_user_config(user_config)
        async with self._reconfigure_lock:
            if self.index is not None and self.index.config == index:
                return
            if self._pending is not None and self._pending.config == index:
                return
            try:
                state = await asyncio.to_thread(self._load_index, index)
            except Exception as exc:
                if self.index is None:
                    raise                   # the first version must load: a configuration error
                self.index_error = f"index version {index.version!r} failed to load, keeping " \
                                   f"{self.index.config.version!r}: {exc}"
                log.error(self.index_error)
                return
            self._pending = None
            if state.meta is None and state.error and self._usable(self.index):
                self._pending = state
                self.index_error = f"{state.error}; still serving version {self.index.config.version!r}"
                threading.Thread(target=self._watch_meta, args=(state, True), daemon=True).start()
                return
            self._adopt(state)
            if state.meta is None and state.error:        # nothing better to serve: fall back meanwhile
                threading.Thread(target=self._watch_meta, args=(state, False), daemon=True).start()

    def _usable(self, state: IndexState | None) -> bool:
        return state is not None and (self.client is None or state.meta is not None
                                      or state.config.source("dense") is None)

    def _adopt(self, state: IndexState) -> None:
        if self.index is not None:
            self.index.retired = True
        self.index, self.index_error = state, None
        log.info("index version %s in use (%s)", state.config.version, state.describe(self.client is not None))

    def _load_index(self, index: IndexConfig) -> IndexState:
        from serving.index_data import load_version_stores

        stores = self.compute.call(load_version_stores, index, self.target, dense=self.client is None)
        state = IndexState(config=index, sparse=stores.sparse, dense=stores.dense)
        if self.client is not None and index.source("dense") is not None:
            state.meta = self._wait_for_meta(index, self.cfg.decoder.index_wait_s)
            if state.meta is None:
                state.error = f"index version {index.version!r} is not loaded on the shards yet"
        return state

    def _wait_for_meta(self, index: IndexConfig, wait_s: float):
        from decoding.fingerprint import model_fingerprint
        from index.dense_format import check_compatible

        deadline = time.monotonic() + wait_s
        while True:
            meta = self.client.describe(index.key(), timeout_s=max(1.0, min(10.0, wait_s)))
            if meta is not None:
                if meta.fingerprint is not None:
                    check_compatible(meta, model_fingerprint(self.target))
                return meta
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def _watch_meta(self, state: IndexState, adopt: bool) -> None:
        """Poll the shards for `state`'s version; with `adopt`, swap it in once they hold it."""
        while state.meta is None and not state.retired and (not adopt or self._pending is state):
            try:
                meta = self._wait_for_meta(state.config, 5.0)
            except Exception as exc:             # e.g. built for another model: refused for good
                state.error = str(exc)
                if adopt:
                    self.index_error = f"index version {state.config.version!r} refused: {exc}"
                return
            if meta is not None:
                state.meta, state.error = meta, None
                if adopt and self._pending is state:
                    self._pending = None
                    self._adopt(state)
                return

    # -- one request --------------------------------------------------------------------------

    def _cost_curve(self) -> dict:
        with self._cost_lock:
            if self._cost is None:
                from decoding.cost import cost_curve

                self._cost = self.compute.call(cost_curve, self.target, COST_SIZES)
            return self._cost

    def _budget(self, req):
        if req.budget != "adaptive":
            return req.budget
        from decoding.budget import AdaptiveBudget, draft_sizes, shared_estimates

        cost = self._cost_curve()
        # Requests of one method and verification mode start from what the earlier ones learned.
        # (With a predicted output, from the earlier ones with one: decoding.drafters.prediction.)
        key = (req.method, req.verification, "greedy" if req.params.greedy else "sampled",
               *(("prediction",) if req.prediction else ()))
        return AdaptiveBudget(cost, sizes=draft_sizes(cost, req.soft), shared=shared_estimates(self, key))

    def _encode(self, req) -> list[int]:
        from decoding.engine import encode_prompt

        if req.kind == "completion":
            ids = list(req.prompt_ids) if req.prompt_ids is not None else encode_prompt(self.model, req.prompt,
                                                                                         chat=False)
        elif len(req.messages) == 1 and req.messages[0]["role"] == "user":
            ids = encode_prompt(self.model, req.messages[0]["content"], chat=True)
        else:
            tok = self.model.tokenizer
            if not getattr(tok, "chat_template", None):
                ids = encode_prompt(self.model, "\n\n".join(m["content"] for m in req.messages), chat=False)
            else:
                enc = tok.apply_chat_template(req.messages, add_generation_prompt=True)
                ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        self.target.check_prompt(ids)       # ContextLengthError: the prompt does not fit
        return ids

    def _drafter(self, req, state: IndexState | None):
        """(drafter, the remote store or None, index report or None)."""
        from decoding.drafters import PromptLookupDrafter
        from decoding.methods import NEEDS_DENSE, NEEDS_SPARSE, Datastores, make_drafter
        from serving.drafting import FallbackDrafter
        from serving.remote_index import RemoteDenseStore

        method = req.method
        uses_index = method in NEEDS_DENSE or method in NEEDS_SPARSE
        if uses_index and state is None:
            raise APIError(503, "the index is still loading", "server_error", None, "index_loading", 1)
        if not uses_index:
            return make_drafter(method), None, None
        report = state.describe(self.client is not None)
        stores = Datastores(sparse=state.sparse, dense=state.dense)
        if method not in NEEDS_DENSE or self.client is None:
            return make_drafter(method, stores), None, report
        if state.config.source("dense") is None:
            return make_drafter(method, stores), None, report      # 400: no dense datastore configured
        if state.meta is None or not self.client.available():
            why = state.error or "every index shard is down"
            return FallbackDrafter(PromptLookupDrafter(), None, reason=f"index shards unavailable: {why}"), \
                None, report
        store = RemoteDenseStore(self.client, state.meta)
        stores.dense = store
        return FallbackDrafter(make_drafter(method, stores), store), store, report

    def _stats(self, req, result, drafter, store, report, prompt_len: int, timing: dict) -> dict:
        s = result.stats
        out = {"method": req.method, "verification": req.verification,
               "budget": req.budget, "steps": s.steps, "mat": round(s.mat, 4),
               "acceptance_rate": round(s.acceptance_rate, 4), "drafted_tokens": s.drafted,
               "accepted_tokens": s.accepted, "prompt_tokens": prompt_len, "completion_tokens": s.new_tokens,
               "tokens_per_s": round(s.tokens_per_s, 2), "time_prefill_s": round(s.time_prefill, 4),
               "time_total_s": round(s.time_total, 4), "time_draft_s": round(s.time_draft, 4),
               "time_verify_s": round(s.time_verify, 4), "time_commit_s": round(s.time_commit, 4),
               "time_encode_s": round(timing.get("encode", 0.0), 4),
               "time_queue_s": round(timing.get("queue", 0.0), 4),
               "finish_reason": s.finish_reason, "replica": self.replica, "dtype": s.dtype}
        if s.soft_gates is not None:
            out["soft_gates"] = s.soft_gates
        if report is not None:
            if store is not None:
                report = {**report, "searches": store.searches, "partial_searches": store.partial}
            out["index"] = report
        fallback = drafter.report() if hasattr(drafter, "report") else None
        out["fallback"] = fallback
        return out

    def _run(self, req, emit, cancel: threading.Event, t_call: float) -> None:
        """One generation, in a worker thread; every outcome is an event."""
        from decoding.engine import Sequence
        from decoding.errors import SenseError

        t_run = time.perf_counter()
        timing = {"queue": t_run - t_call}      # waiting for a worker thread of this replica
        self._count("active", 1)
        try:
            try:
                prompt_ids = self._encode(req)
                timing["encode"] = time.perf_counter() - t_run
                drafter, store, report = self._drafter(req, self.index)
                method_drafter, prediction = drafter, None
                if req.prediction:
                    from decoding.drafters.prediction import PredictionDrafter

                    prediction = self.model.tokenizer(req.prediction, add_special_tokens=False)["input_ids"]
                    drafter = PredictionDrafter(drafter, prediction)
                budget = self._budget(req)
            except SenseError as exc:
                emit({"type": "error", "error": from_sense_error(exc, "prompt" if req.kind == "completion"
                                                                 else "messages").to_dict()})
                return
            except APIError as exc:
                emit({"type": "error", "error": exc.to_dict()})
                return
            params = req.params
            if params.top_k >= self.target.vocab_size:         # keeps every token: the same as no filter
                params = dataclasses.replace(params, top_k=0)
            hooks = {"should_stop": cancel.is_set}
            scored = req.logprobs if req.echo else None         # the prompt's own log-probabilities
            try:
                seq = Sequence(self.model, prompt_ids, params=params, drafter=drafter, budget=budget, soft=req.soft,
                               logprobs=req.logprobs, prompt_logprobs=scored, grammar=req.grammar, **hooks)
            except SenseError as exc:           # e.g. a logit_bias token outside the vocabulary
                emit({"type": "error", "error": from_sense_error(exc).to_dict()})
                return
            emit({"type": "start", "prompt_tokens": len(prompt_ids)})
            stream = (StreamBuffer(emit, lambda: stream_interval(self.cfg.decoder, self.counts["active"]),
                                   logprobs=seq.token_logprobs) if req.stream else None)
            seq.on_tokens = stream.push if stream else None
            if stream is not None and req.echo:
                # The echoed prompt (and its scores, computed by the prefill) before the first tokens.
                def echo_first(ids: list[int]) -> None:
                    emit(self._echo(req, prompt_ids, seq.prompt_token_logprobs, type="echo"))
                    seq.on_tokens = stream.push
                    stream.push(ids)
                seq.on_tokens = echo_first
            if self.batch is not None:
                result = self.batch.run(seq).result()
            elif self.cfg.decoder.serialize_forward:
                # Each piece (prefill, step: drafting, the forward, acceptance) on the compute
                # thread, between other requests' pieces: no torch work on this request's thread,
                # so no second OpenMP pool (decoding/compute_thread.py).
                result = seq.run(self.compute.call)
            else:
                result = seq.run()
            stats = self._stats(req, result, method_drafter, store, report, len(prompt_ids), timing)
            fell_back = stats["fallback"] is not None
            self.metrics.finished(req.method, result.stats, fell_back)
            self._count("fallbacks", int(fell_back))
            if result.finish_reason == "cancelled":
                self._count("cancelled", 1)
                self.last_cancelled = {"request_id": req.request_id, "tokens": len(result.token_ids),
                                       "max_tokens": req.params.max_new_tokens, "speculative": stats}
            else:
                self._count("completed", 1)
            if stream is not None:
                stream.flush()
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(result.token_ids),
                     "total_tokens": len(prompt_ids) + len(result.token_ids),
                     "prompt_tokens_details": {"cached_tokens": result.stats.cached_tokens}}
            if prediction is not None:
                from decoding.drafters.prediction import prediction_usage

                usage["completion_tokens_details"] = prediction_usage(prediction, result.token_ids)
            done = {"type": "done", "text": result.text, "token_ids": list(result.token_ids),
                    "finish_reason": result.finish_reason, "usage": usage, "speculative": stats}
            if result.logprobs is not None and not req.stream:     # (streamed: with each chunk's tokens)
                done["logprobs"] = result.logprobs
            if req.echo and not req.stream:
                echo = self._echo(req, prompt_ids, result.prompt_logprobs)
                done["prompt_text"] = echo["text"]
                done.update({k: v for k, v in echo.items() if k.startswith("prompt_")})
            emit(done)
        except Exception as exc:       # a bug or a broken model: logged here, a generic 500 outside
            self._count("errors", 1)
            log.exception("generation %s failed", req.request_id)
            emit({"type": "error", "error": internal(f"generation failed ({type(exc).__name__})").to_dict()})
        finally:
            self._count("active", -1)

    def _count(self, name: str, delta: int) -> None:
        with self._counts_lock:
            self.counts[name] += delta
            active = self.counts["active"]
        if name == "active":
            self.metrics.active.set(active)

    async def generate(self, req):
        """Stream the events of one request (see the module docstring). Cancelling the stream
        (the client went away) stops the generation at its next step."""
        from serving.text import TextStream

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        future = loop.run_in_executor(self.pool, self._run, req, emit, cancel, time.perf_counter())
        # Detokenised here, once per chunk, not on the compute thread once per step.
        text = TextStream(self.model.tokenizer, req.params.stop) if req.stream else None
        held = None
        try:
            while True:
                event, held = relay(held if held is not None else await queue.get(), queue, text)
                if req.logprobs is not None:
                    event = self._logprob_entries(event)
                yield event
                if event["type"] in ("done", "error"):
                    break
        finally:
            if not future.done():
                cancel.set()

    def _echo(self, req, prompt_ids: list[int], scores, **extra) -> dict:
        """The echoed prompt: its text (as sent, or its token ids decoded) and, when scored, its
        ``TokenLogprob`` records with its ids (``_logprob_entries`` turns them into entries)."""
        text = req.prompt if req.prompt is not None else self.model.tokenizer.decode(prompt_ids,
                                                                                     skip_special_tokens=True)
        out = {**extra, "text": text}
        if scores is not None:
            out["prompt_ids"], out["prompt_logprobs"] = prompt_ids, scores
        return out

    def _logprob_entries(self, event: dict) -> dict:
        """`event` with its ``TokenLogprob`` records (its own, its inner delta's) as OpenAI
        entries (serving/logprobs.py), their tokens' texts decoded here, not on the compute thread."""
        from serving.logprobs import TokenTexts, entries

        if self._token_texts is None:
            self._token_texts = TokenTexts(self.model.tokenizer)
        if "logprobs" in event:
            event = {**event, "logprobs": entries(self._token_texts, event["logprobs"])}
        if "prompt_logprobs" in event:         # the first prompt token has no context: no log-probability
            first, raw = self._token_texts(event["prompt_ids"][0])
            event = {**event, "prompt_logprobs": [{"token": first, "logprob": None, "bytes": raw, "top_logprobs": None},
                                                  *entries(self._token_texts, event["prompt_logprobs"])]}
            del event["prompt_ids"]
        if "delta" in event:
            event = {**event, "delta": self._logprob_entries(event["delta"])}
        return event

    async def ping(self, req=None):
        """One event: the ingress's first streaming call at its start, with a request it does not
        run, so that no real request is the first (see ``Ingress._warm_up``)."""
        yield {"type": "pong"}

    # -- status -------------------------------------------------------------------------------

    async def reset_prefix_cache(self) -> dict | None:
        """Empty this replica's prefix cache and return its counters (None: no cache). For
        benchmarks, which ask the same prompts of every method (through a deployment handle, not
        HTTP); the cache is safe to empty while a prefill runs."""
        cache = self.target.prefix_cache
        if cache is None:
            return None
        cache.clear()
        return cache.stats()

    async def info(self) -> dict:
        sharded = self.client is not None
        d = {"replica": self.replica, "model": self.cfg.model.name, **self.counts, "threads": self.threads,
             "dtype": self.target.dtype_choice.to_dict(), "budget": self.cfg.speculative.budget,
             "invariant_forward": self.target.invariant_note, "lean_forward": self.target.lean_note,
             "draft_trees": self.target.takes_trees,
             "kernels": self.target.kernels,
             "prefix_cache": {"note": self.target.prefix_cache_note,
                              **(self.target.prefix_cache.stats() if self.target.prefix_cache else {})},
             "batch": self.batch.scheduler.stats() if self.batch is not None else None,
             "verify_cost": {n: round(c / self._cost[0], 3) for n, c in sorted(self._cost.items())}
             if self._cost else None,
             "last_cancelled": self.last_cancelled,
             "index": self.index.describe(sharded) if self.index else None,
             "index_error": self.index_error}
        if sharded:
            d["shards"] = self.client.status()
        return d

    def check_health(self) -> None:
        if self.target is None:
            raise RuntimeError("the target model is not loaded")
