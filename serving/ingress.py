"""The HTTP ingress: an OpenAI-compatible FastAPI app under ``@serve.ingress``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``.
Requests are validated
here (a 400 never costs a decoder slot, except prompt length, which needs the tokenizer) and
sent to the decoder deployment as one streaming handle call; its first event decides the HTTP
status, so errors are proper statuses even for streaming requests. Overload (the decoder's
``max_queued_requests`` reached) is a 503 or 429 with Retry-After. A client that disconnects
cancels its handle call, and with it the generation. A decoder replica that dies under a request
(crash, node loss, kill) is a 503 with Retry-After (Serve replaces the replica); mid-stream, an
error event then ``[DONE]``: a stream never ends without either its finish chunk or an error.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the
# route methods that Serve re-wraps.
import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving import protocol
from serving.auth import APIKeyMiddleware, load_api_keys
from serving.config import ServingConfig
from serving.errors import APIError, internal, overloaded
from serving.responses import SSE_DONE, chunk, full_body, merged_body, sse, tool_calls, total_usage, usage_chunk

log = logging.getLogger("ray.serve")



def _this_ingress():
    """The Ingress instance of this Serve replica (Serve resolves the routes' `self` the same way);
    raises outside a replica."""
    return serve.get_replica_context().servable_object


def _api_keys():
    """This replica's API keys, None when authentication is off. Raises (the middleware then
    refuses the request) if the replica is not there: never open by accident."""
    return _this_ingress().api_keys


class _App(FastAPI):
    def openapi(self) -> dict:
        """FastAPI's document completed with the request bodies, error responses, the max_tokens
        bound and bearer authentication, as this replica is configured (defaults outside one)."""
        if not self.openapi_schema:
            try:
                cfg = _this_ingress().cfg
            except Exception:
                cfg = ServingConfig()
            self.openapi_schema = protocol.openapi_document(super().openapi(), cfg)
        return self.openapi_schema


app = _App(title="SENSE on Ray", version="0.1.0",
           description="Retrieval-based speculative decoding behind an OpenAI-compatible API")
# Before anything is routed (unknown paths and the OpenAPI document included): the API key.
app.add_middleware(APIKeyMiddleware, keys=_api_keys)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    resp = _error_response(APIError(exc.status_code, msg, "invalid_request_error", None, kind))
    resp.headers.update(exc.headers or {})          # e.g. Allow on a 405
    return resp


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    param = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
    msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
    return _error_response(APIError(400, f"Invalid value for {param}: {msg}", "invalid_request_error", param,
                                    "invalid_value"))


def _decoder_failure(exc: Exception, retry_after: int) -> APIError:
    """What a client is told when the handle call to the decoder fails: the replica died (a
    503 with Retry-After: Serve replaces it, a retry lands on another one) or anything else (500)."""
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return APIError(503, "the decoder replica serving this request failed; retry", "server_error", None,
                        "replica_failed", retry_after)
    return internal()


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(internal())


# Defined before the Ingress class: Serve pickles the class when it is decorated, with the module
# globals its methods name that exist by then.
_END = object()


async def _merged(streams):
    """(choice index, event) of every stream, as each comes; one stream read directly."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for event in stream:
                await queue.put((i, event))
            await queue.put((i, _END))
        except Exception as exc:    # a failed choice fails the stream (the caller says so)
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if event is _END:
                left -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield i, event
    finally:
        for t in tasks:
            t.cancel()


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, static: dict, decoder) -> None:
        from serving.metrics import IngressMetrics

        self.cfg = ServingConfig.model_validate(static)
        ing = self.cfg.ingress
        # A configured key source that gives no key stops the replica here (a clear deploy error).
        self.api_keys = load_api_keys(ing.api_keys_file, ing.api_keys_env)
        if self.api_keys is not None:
            log.info("API-key authentication on: %d key(s)", len(self.api_keys))
        self.decoder = decoder
        self.metrics = IngressMetrics()
        self.started = int(time.time())
        try:        # the task kept referenced: the event loop holds only a weak reference to it
            self._warming = asyncio.get_running_loop().create_task(self._warm_up())
        except RuntimeError:            # no event loop: constructed outside a Serve replica
            self._warming = None

    async def _warm_up(self) -> None:
        """What a request would do first in this replica, done before any comes: validate a
        body (pydantic's first validation) and make one streaming call to the decoder with the
        request it gives (the handle's first call, and the decoder's first unpickling of a
        request, which imports its module). On the 2-core EPYC the first request's validation
        took 6-10 ms and its call until the decoder's first event 39-54 ms before; 3 and 13.5 ms
        after. The call waits for a decoder replica as a request would; a failure only logs."""
        body = b'{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}'
        try:
            gen = protocol.chat_request(protocol.parse(protocol.ChatRequest, body), self.cfg)
            async for _ in self.decoder.options(stream=True).ping.remote(gen):
                pass
        except Exception as exc:
            log.info("ingress warm-up failed (%s); requests are not affected", type(exc).__name__)

    # -- routes -------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, protocol.CompletionRequest, protocol.completion_request,
                                    "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, protocol.ChatRequest, protocol.chat_request, "/v1/chat/completions")

    def _model_card(self) -> dict:
        return {"id": self.cfg.model.name, "object": "model", "created": self.started, "owned_by": "sense-on-ray"}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str):
        """One model (the OpenAI client's ``models.retrieve``); a hub id's slash is part of it."""
        if model != self.cfg.model.name:
            return _error_response(protocol.unknown_model(model, self.cfg))
        return self._model_card()

    @app.get("/health")
    async def health(self):
        """200 while the decoder answers (status "degraded" when its index is not fully there:
        requests then fall back to PLD drafting); 503 when it does not answer."""
        try:
            info = await asyncio.wait_for(self.decoder.info.remote(), self.cfg.ingress.health_timeout_s)
        except Exception as exc:
            err = APIError(503, f"the decoder does not answer ({type(exc).__name__})", "server_error", None,
                           "unavailable", self.cfg.ingress.retry_after_s)
            return _error_response(err)
        index = info.get("index") or {}
        shards_down = (info.get("shards") or {}).get("down")
        degraded = bool(info.get("index_error") or index.get("error") or shards_down)
        return {"status": "degraded" if degraded else "ok", "model": self.cfg.model.name, "decoder": info}

    # -- generation ---------------------------------------------------------------------------

    async def _generate(self, request: Request, model_cls, convert, route: str):
        t0 = time.perf_counter()
        status, streaming = 500, False
        streams = []
        try:
            req = protocol.parse(model_cls, await self._body(request))
            gen = convert(req, self.cfg)
            streaming = gen.stream
            # One decoder call per choice (n > 1: side by side, batched in the decoder together).
            gens = protocol.choices(gen)
            streams = [self.decoder.options(stream=True).generate.remote(g) for g in gens]
            await asyncio.gather(*(self._first_event(s) for s in streams))
            if gen.stream:
                status = 200
                return StreamingResponse(self._sse(gens, req, streams, t0, route), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            bodies = await asyncio.gather(*(self._collect(g, s) for g, s in zip(gens, streams)))
            status = 200
            return JSONResponse(bodies[0] if len(bodies) == 1 else merged_body(bodies))
        except APIError as err:
            status = err.status
            return _error_response(err)
        except asyncio.CancelledError:
            status = 499                # client closed the request
            raise
        except Exception as exc:
            log.exception("request on %s failed", route)
            err = _decoder_failure(exc, self.cfg.ingress.retry_after_s)
            status = err.status
            return _error_response(err)
        finally:
            if status != 200 and len(streams) > 1:     # the other choices' generations stop too
                for s in streams:
                    s.cancel()
            if status != 200 or not streaming:     # a stream records itself when it ends
                self.metrics.request(route, status, time.perf_counter() - t0)

    async def _body(self, request: Request) -> bytes:
        try:
            return await protocol.read_body(request.headers.get("content-length"), request.stream(),
                                            self.cfg.ingress.max_body_bytes)
        except ClientDisconnect:
            raise APIError(499, "the client closed the connection while sending the body", "invalid_request_error",
                           None, "client_closed") from None

    async def _first_event(self, stream) -> dict:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        ing = self.cfg.ingress
        try:
            first = await stream.__anext__()
        except BackPressureError:
            raise overloaded(ing.overload_status, ing.retry_after_s) from None
        except DeploymentUnavailableError:
            raise APIError(503, "the decoder is unavailable", "server_error", None, "unavailable",
                           ing.retry_after_s) from None
        except StopAsyncIteration:
            raise internal("the decoder ended the request without an answer") from None
        if first["type"] == "error":
            raise APIError.from_dict(first["error"])
        return first

    async def _collect(self, gen, stream) -> dict:
        try:
            async for event in stream:
                if event["type"] == "done":
                    return full_body(gen, self.cfg.model.name, event, event["text"])
                if event["type"] == "error":
                    raise APIError.from_dict(event["error"])
        except asyncio.CancelledError:
            stream.cancel()             # the client went away: stop the generation
            raise
        raise internal("the decoder ended the request without an answer")

    async def _sse(self, gens, req, streams, t0, route):
        """The SSE events of a streamed request (its n choices' chunks as they come, each with its
        index). Each yield is one message through Serve's proxy (and, on a machine of few cores, a
        stall of the forward running beside it), so events that are ready together go out
        together: the chat role chunk with the first tokens, and the last tokens (which the
        decoder sends within its finish event), the finish chunk, the usage chunk and ``[DONE]``
        as one."""
        name = self.cfg.model.name
        usage_wanted = protocol.include_usage(req)
        ids = gens[0].return_token_ids
        first_token = False
        status = 200
        # Per choice: the chat role chunk not yet sent, the characters of the tokens whose
        # logprobs went out (completions), and whether its finish chunk (or an error) went out.
        head = [sse(chunk(g, name, text="", role=True)) if g.kind == "chat" else "" for g in gens]
        offset = [0] * len(gens)
        done: dict[int, dict] = {}
        # With tools, an answer that may be a call is held until it ends (only then is it known to
        # be one); one that starts like no call (not with {, [, ` or <) is let go and streams.
        held = [{"text": "", "token_ids": [], "logprobs": None, "free": False} for _ in gens] \
            if gens[0].tool_names else None

        def tokens(i: int, delta: dict) -> str:
            nonlocal first_token
            if delta["text"] and not first_token:
                first_token = True
                self.metrics.first_token(route, time.perf_counter() - t0)
            logprobs = delta.get("logprobs")
            if held is not None and not held[i]["free"]:
                h = held[i]
                h["text"] += delta["text"]
                h["token_ids"] += delta["token_ids"]
                if logprobs is not None:
                    h["logprobs"] = (h["logprobs"] or []) + logprobs
                start = h["text"].lstrip()
                if not start or start[0] in "{[`<":
                    return ""
                h["free"] = True            # plain text: what was held goes out, the rest streams
                delta, logprobs = h, h["logprobs"]
            if delta["text"] or ids or logprobs:
                out = sse(chunk(gens[i], name, text=delta["text"], token_ids=delta["token_ids"] if ids else None,
                                logprobs=logprobs, offset=offset[i]))
                offset[i] += sum(len(e["token"]) for e in logprobs or ())
                return out
            return ""

        try:
            tail, failed = "", False
            async for i, event in _merged(streams):
                gen, kind = gens[i], event["type"]
                if kind == "echo":          # completions' echo: the prompt (and its scores) first
                    prompt = event.get("prompt_logprobs")
                    head[i] += sse(chunk(gen, name, text=event["text"], token_ids=[] if ids else None,
                                         logprobs=prompt))
                    offset[i] += sum(len(e["token"]) for e in prompt or ())
                elif kind == "delta":
                    out = tokens(i, event)
                    if out:
                        yield head[i] + out
                        head[i] = ""
                elif kind == "done":
                    tail += head[i] + (tokens(i, event["delta"]) if "delta" in event else "")
                    head[i] = ""
                    finish = event["finish_reason"]
                    if held is not None and not held[i]["free"]:    # the whole answer: a call, or its text
                        h = held[i]
                        text = h["text"] + event["text"]
                        calls = tool_calls(gen, text)
                        if calls:
                            tail += sse(chunk(gen, name, calls=calls))
                            finish = "tool_calls"
                        elif text or ids or h["logprobs"]:
                            tail += sse(chunk(gen, name, text=text, token_ids=h["token_ids"] if ids else None,
                                              logprobs=h["logprobs"]))
                    elif event["text"]:
                        tail += sse(chunk(gen, name, text=event["text"], token_ids=[] if ids else None))
                    stats = {"speculative": event["speculative"]}
                    tail += sse(chunk(gen, name, finish_reason=finish, extra=None if usage_wanted else stats))
                    done[i] = event
                    if len(done) == len(gens):
                        break
                    yield tail              # (n > 1: the others go on)
                    tail = ""
                elif kind == "error":
                    status = event["error"]["status"]
                    tail += "".join(head) + sse(APIError.from_dict(event["error"]).body())
                    failed = True
                    break
            if failed:
                for s in streams:
                    s.cancel()
            elif len(done) < len(gens):     # never a truncated stream that looks complete
                log.error("stream %s: the decoder stopped without finishing", gens[0].request_id)
                status = 500
                tail += "".join(head) + sse(internal("the decoder stopped the generation without finishing it").body())
                for s in streams:
                    s.cancel()
            elif usage_wanted:
                events = [done[i] for i in range(len(gens))]
                usage = total_usage([e["usage"] for e in events])
                stats = [e["speculative"] for e in events]
                tail += sse(usage_chunk(gens[0], name, usage, {"speculative": stats[0] if len(stats) == 1 else stats}))
            yield tail + SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = 499                # the client disconnected mid-stream: stop the generation
            for s in streams:
                s.cancel()
            raise
        except Exception as exc:        # the decoder failed mid-stream: say so, end the stream cleanly
            log.exception("stream %s failed", gens[0].request_id)
            for s in streams:
                s.cancel()
            err = _decoder_failure(exc, self.cfg.ingress.retry_after_s)
            status = err.status
            if err.status == 500:
                err.message = "the generation failed mid-stream"
            yield sse(err.body())
            yield SSE_DONE
        finally:
            self.metrics.request(route, status, time.perf_counter() - t0)
