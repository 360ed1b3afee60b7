"""Typed configuration of the Serve application: every knob in one place.

`build_app(args)` (serving/app.py) validates its `args` into :class:`ServingConfig`; unknown keys
and out-of-range values are refused with a message naming them. The sections:

- ``model``: the target model and how it is loaded;
- ``index``: which datastores the drafters retrieve from. This section travels to the decoder
  and the shard deployments as their ``user_config``, so a new index version is swapped in
  without restarting replicas (see :class:`IndexConfig`);
- ``speculative`` / ``sampling``: request defaults (a request's ``speculative`` object and
  sampling fields override them);
- ``decoder``, ``shards``, ``ingress``: the three deployments' replicas, resources, limits.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from decoding.methods import METHOD_NAMES

# Deployment names: Serve config files override deployment options (user_config for a hot
# swap, autoscaling, resources) by these names.
INGRESS_NAME = "Ingress"
DECODER_NAME = "Decoder"
SHARD_NAME = "IndexShard{}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The target model."""

    path: str | None = Field(None, description="HF model directory, hub id or .gguf file (converted once into "
                                               "the local cache, decoding.model_loader); None: the embedded "
                                               "SmolLM2-135M GGUF")
    name: str | None = Field(None, min_length=1,
                             description="the model id clients send and GET /v1/models lists; None: "
                                         "named after the model (served_model_name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the faster of the dtypes the device supports, measured once per machine "
                            "and model (decoding.dtype_choice)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica has a GPU")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per decoder replica")
    prefix_cache_mb: int = Field(256, ge=0,     # decoding.target.PREFIX_CACHE_MB (no torch in the ingress)
                                 description="per decoder replica: prompts kept so that later "
                                 "prompts beginning the same way (the chat template, a conversation's earlier "
                                 "turns) run only the rest (exact; decoding/prefix_cache.py); 0: off")

    @model_validator(mode="after")
    def _named(self):
        if self.name is None:
            self.name = served_model_name(self.path)
        return self


EMBEDDED_NAME = "smollm2-135m-instruct"


def served_model_name(path: str | None) -> str:
    """The id a server of the model at `path` answers to when ``model.name`` is not set: a hub id
    as given ("Qwen/Qwen2.5-0.5B-Instruct"), a local directory's or file's own name (a ``.gguf``
    file's without the suffix), the embedded default's for None. Only the string is read: the
    ingress, which validates requests against it, loads no model."""
    if path is None:
        return EMBEDDED_NAME
    text = str(path).rstrip("/\\")
    local = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1 or text.endswith(".gguf")
    if not local:
        return text                                     # owner/name: a hub id
    base = text.replace("\\", "/").rsplit("/", 1)[-1]
    return (base[:-len(".gguf")] if base.lower().endswith(".gguf") else base) or text


class IndexConfig(_Section):
    """The datastores of one index version: the hot-swappable part of the configuration.

    ``uri``: an index artifact (``pipelines.build_index`` output: a root whose CURRENT names the
    version, or one version directory; local path or ``s3://``); ``artifact_version`` pins a
    version (``v0003``) instead of following CURRENT.
    ``dense``: where the dense (FAISS) store comes from: ``"auto"`` (the artifact when ``uri`` is
    set, else ``"default"``), ``"artifact"``, ``"default"`` (the first ``dense_default_docs``
    GSM8K train pairs, built into the local cache on first use), a dense datastore directory
    (``sense build-dense``), or None (methods dense, dresd and sense unavailable).
    ``sparse``: the REST suffix index, with the same choices (``"default"``: GSM8K train answers).
    The sources are loaded by ``decoding.stores.load_datastores``, as ``sense generate --index``
    loads them. ``version`` labels the version; responses report it. Changing this section in a deployment's
    ``user_config`` makes its replicas load the new version while they keep serving.
    """

    version: str = Field("v1", min_length=1)
    uri: str | None = None
    artifact_version: str | None = None
    dense: str | None = "auto"
    sparse: str | None = "auto"
    dense_default_docs: int = Field(200, ge=1)          # as the CLI's (decoding.demo_stores.DEFAULT_DENSE_DOCS)
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed per dense search (None: the store's)")

    @model_validator(mode="after")
    def _sources(self):
        for name in ("dense", "sparse"):
            if getattr(self, name) == "artifact" and not self.uri:
                raise ValueError(f"index.{name} is 'artifact' but index.uri is not set")
        return self

    def source(self, kind: str) -> str | None:
        """"artifact", "default", a directory, or None for `kind` ("dense" or "sparse")."""
        value = getattr(self, kind)
        if value == "auto":
            return "artifact" if self.uri else "default"
        return value

    def key(self) -> str:
        """A short id of this version's content (label and sources)."""
        raw = json.dumps(self.model_dump(), sort_keys=True).encode()
        return f"{self.version}-{hashlib.sha256(raw).hexdigest()[:8]}"

    def user_config(self) -> dict:
        return {"index": self.model_dump()}

    @classmethod
    def from_user_config(cls, user_config: Any) -> "IndexConfig":
        if not isinstance(user_config, dict) or set(user_config) - {"index"}:
            raise ValueError(f"user_config must be {{'index': {{...}}}}, got {user_config!r}")
        return cls.model_validate(user_config.get("index") or {})


class SoftDefaults(_Section):
    theta: float = Field(0.3, ge=0, allow_inf_nan=False)
    top_k: int = Field(3, ge=2)
    lam: float = Field(0.5, gt=0, le=1)
    window: int = Field(6, ge=1)
    tau: float | None = Field(0.8, ge=-1, le=1, allow_inf_nan=False)  # None: no cosine stand-in


class SpeculativeDefaults(_Section):
    """What a request gets when its ``speculative`` object leaves a field out."""

    method: Literal[METHOD_NAMES] = "sense"         # the names of decoding.methods.METHODS
    verification: Literal["strict", "soft"] = "strict"
    budget: int | Literal["adaptive"] = Field("adaptive", description="draft nodes per step, or adaptive")
    max_budget: int = Field(256, ge=1, description="largest budget a request may ask for")
    soft: SoftDefaults = Field(default_factory=SoftDefaults)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("budget must be >= 1 or 'adaptive'")
        return v


class SamplingDefaults(_Section):
    completion_max_tokens: int = Field(16, ge=1, description="OpenAI's default for /v1/completions")
    chat_max_tokens: int | None = Field(None, ge=1, description="None: up to the context window")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens_limit: int = Field(1 << 20, ge=1, description="the largest max_tokens a request may ask for "
                                                             "(more: 400); generation also ends at the context window")
    max_n: int = Field(8, ge=1, description="the most choices (n) one request may ask for (more: 400); each is "
                                            "decoded as a request of its own, batched with the others")

    @model_validator(mode="after")
    def _defaults_within_limit(self):
        for name in ("completion_max_tokens", "chat_max_tokens"):
            value = getattr(self, name)
            if value is not None and value > self.max_tokens_limit:
                raise ValueError(f"sampling.{name} {value} exceeds sampling.max_tokens_limit {self.max_tokens_limit}")
        return self


def _check_autoscaling(value: dict | None) -> dict | None:
    if value is None:
        return None
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**value)          # Serve's own validation, at configuration time
    return dict(value)


class DecoderConfig(_Section):
    """The decoder deployment: the target model and the decode loop."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling_config is None")
    autoscaling_config: dict | None = Field(
        None, description="Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, "
                          "upscale_delay_s, downscale_delay_s, metrics_interval_s, look_back_period_s, ...)")
    max_ongoing_requests: int = Field(16, ge=1, description="concurrent generations per replica (with batching: "
                                                            "the most requests verified in one forward)")
    max_queued_requests: int = Field(16, ge=-1, description="queued at each caller before 503/429 (-1: no limit)")
    queued_in_replica: int = Field(4, ge=0, description="with batching: requests a replica takes beyond "
                                   "max_ongoing_requests, waiting in its scheduler to join the batch at the "
                                   "step a running one ends, instead of at the caller until Serve learns a "
                                   "slot is free (a round trip of the stream's end and a new request, during "
                                   "which the batch runs a request short); they count as ongoing for Serve "
                                   "(autoscaling, load shedding)")
    ray_actor_options: dict = Field(default_factory=lambda: {"num_cpus": 1},
                                    description="num_cpus, num_gpus, memory, resources, runtime_env ...")
    batching: bool = Field(True, description="continuous batching: every running request's draft tree verified "
                                             "in one forward per step (decoding/scheduler.py); false: each request "
                                             "runs its own decode loop")
    prefill_tokens_per_step: int = Field(256, ge=1, description="with batching: a step prefills waiting requests "
                                         "while the prompt positions it runs total at most this many (a longer "
                                         "prompt runs in pieces of this size, a step each, with the prefix cache; "
                                         "all of them when none is running): the most prefill the running "
                                         "requests wait for in a step")
    prefill_prompts_per_step: int = Field(1, ge=1, description="with batching, while requests are running: the "
                                          "most prompts a step prefills (or goes on prefilling), or more where "
                                          "more wait than one answer's steps (the waiting over the mean steps of "
                                          "the answers that ended): requests that arrive together start apart, "
                                          "over about one answer's time, so their answers end apart")
    stream_interval_ms: float = Field(250.0, ge=0, description="a streamed request's tokens are sent at most "
                                      "this often (the first at once, the last with the finish): every "
                                      "chunk costs CPU in the replica, the ingress, the proxy and the client, "
                                      "taken from the decode loop on a small machine (2 cores, one streamed "
                                      "SENSE request at a time: 0.92x the in-process engine at 100 ms, 0.95x "
                                      "at 250); 0: one chunk per step")
    stream_chunks_per_s: float = Field(30.0, ge=0, description="the replica's streams together send at most about "
                                       "this many chunks a second: with more streams than this times "
                                       "stream_interval_ms, each stream's interval grows to streams / this "
                                       "(8 streams: 267 ms; measured on the 2-core machine at 8 in flight: "
                                       "one chunk costs ~2 ms of CPU across the replica, ingress, proxy and "
                                       "client); 0: no cap")
    serialize_forward: bool = Field(True, description="without batching: one forward pass at a time per replica "
                                                      "(see decoder.py)")
    index_wait_s: float = Field(120.0, ge=0, description="how long a replica waits for the shards to hold a "
                                                           "new index version before it goes on without it (the "
                                                           "current version, else PLD fallback) and keeps watching")
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)

    _autoscaling = field_validator("autoscaling_config")(classmethod(lambda cls, v: _check_autoscaling(v)))

    @property
    def replica_capacity(self) -> int:
        """The requests Serve sends one replica at once: with batching, a batch of
        ``max_ongoing_requests`` and ``queued_in_replica`` waiting beside it."""
        return self.max_ongoing_requests + (self.queued_in_replica if self.batching else 0)


class ShardsConfig(_Section):
    """Index shard deployments. ``num_shards == 0``: the dense index is held in the decoder."""

    num_shards: int = Field(0, ge=0)
    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = Field(256, ge=1)
    ray_actor_options: dict = Field(default_factory=lambda: {"num_cpus": 0.5})
    max_batch_size: int = Field(32, ge=1, description="searches batched into one FAISS call")
    batch_wait_timeout_s: float = Field(0.001, ge=0)
    search_timeout_s: float = Field(0.5, gt=0, description="per decode step, all shards together")
    cooldown_s: float = Field(5.0, ge=0, description="a failed shard is skipped this long")
    versions_kept: int = Field(2, ge=1, description="index versions a shard holds (old ones serve in-flight requests)")

    _autoscaling = field_validator("autoscaling_config")(classmethod(lambda cls, v: _check_autoscaling(v)))


class IngressConfig(_Section):
    """The HTTP ingress (FastAPI)."""

    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    ray_actor_options: dict = Field(default_factory=lambda: {"num_cpus": 0.1})
    overload_status: Literal[429, 503] = 503
    retry_after_s: int = Field(1, ge=0, description="Retry-After on overload responses")
    health_timeout_s: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body accepted (larger: 413), checked "
                                                           "before it is parsed")
    api_keys_file: str | None = Field(
        None, min_length=1, description="API-key authentication: a file of keys, one per line (blank lines and '#' comments "
                          "ignored), read on each ingress replica's node. With this or api_keys_env set, every "
                          "route but GET /health needs 'Authorization: Bearer <key>'; None for both: no "
                          "authentication")
    api_keys_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="API-key authentication: the name of an environment variable of the ingress replicas "
                    "holding comma-separated keys (e.g. SENSE_API_KEYS). The keys themselves never go into "
                    "this configuration")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys_file or self.api_keys_env)


class ServingConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    speculative: SpeculativeDefaults = Field(default_factory=SpeculativeDefaults)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @model_validator(mode="after")
    def _consistent(self):
        s = self.speculative
        if isinstance(s.budget, int) and s.budget > s.max_budget:
            raise ValueError(f"speculative.budget {s.budget} exceeds speculative.max_budget {s.max_budget}")
        if not math.isfinite(self.shards.search_timeout_s):
            raise ValueError("shards.search_timeout_s must be finite")
        return self

    @staticmethod
    def problems(exc: Exception) -> str:
        """A configuration's problems (from :meth:`from_args`) on one line, each as its dotted
        path and what is wrong: ``decoder.queued_in_replica: Input should be greater than or equal
        to 0``."""
        errors = getattr(exc, "errors", None)
        if errors is None:
            return str(exc)
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'args'}: {e.get('msg')}"
                         for e in errors(include_url=False))

    @classmethod
    def from_args(cls, args: dict | None) -> "ServingConfig":
        """Validate Serve application `args` (a dict, possibly nested, possibly empty)."""
        if args is not None and not isinstance(args, dict):
            raise ValueError(f"application args must be a mapping, got {type(args).__name__}")
        return cls.model_validate(args or {})

    @property
    def sharded(self) -> bool:
        return self.shards.num_shards > 0

    def static(self) -> dict:
        """Everything but the index: the deployments' constructor argument. Changing the index
        alone keeps this identical, so Serve reconfigures replicas in place."""
        return self.model_dump(exclude={"index"})


def schema() -> dict:
    """JSON schema of the application args (for docs and config validation)."""
    return ServingConfig.model_json_schema()


def nest_dotted(args: dict) -> dict:
    """`serve run ... a.b=1` passes flat dotted keys with string values: nest them, and read
    numbers, booleans and null the way YAML would."""
    import yaml

    out: dict = {}
    for key, value in args.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
