"""Start the server locally and print its URL: ``python -m serving.run``.

    python -m serving.run                                   # embedded default on 127.0.0.1:8000
    python -m serving.run --port 8080 --set shards.num_shards=2 --set speculative.method=pld
    python -m serving.run --config args.yaml                # an args mapping, or a Serve config file
    python -m serving.run --address auto                    # onto a running cluster (ray start --head)

The default GSM8K datastores the configuration uses are built into the local cache first (once).

Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send) stops it: the application, then the
local Ray instance it started, every process of it; exit status 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

# Ray, Serve, the app and the model are imported inside the functions that need them: `--help`
# and a bad argument answer at once, and the SIGTERM handler is installed before Ray starts.

def load_args(path: str | None, sets: list[str]) -> dict:
    """App args from a YAML/JSON file (an args mapping, or a Serve config whose application imports
    serving.app:build_app) plus dotted ``key=value`` overrides."""
    import yaml

    from serving.config import nest_dotted

    args: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise SystemExit(f"error: {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise SystemExit(f"error: {path}: not YAML or JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise SystemExit(f"error: {path}: expected the app's args or a Serve config (a mapping)")
        if "applications" in raw:
            apps = [a for a in raw["applications"] if a.get("import_path") == "serving.app:build_app"]
            if not apps:
                raise SystemExit(f"error: {path}: no application with import_path serving.app:build_app")
            raw = apps[0].get("args") or {}
        args = raw
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        _merge(args, nest_dotted({key: value}))
    return args


def local_problems(cfg) -> list[str]:
    """What this machine lacks that a local instance's replicas (which run here) would need, as
    ``index.dense: /path does not exist``: the model's and the index's local paths (a hub id is
    the hub's to check, a URI such as ``s3://`` its store's), and CUDA where ``model.device`` or a
    replica's ``num_gpus`` asks for it (Serve would wait forever to place such a replica)."""
    from decoding.errors import ModelLoadError
    from decoding.model_loader import check_device, missing_local_model

    index = cfg.index
    named = (("index.uri", index.uri), ("index.dense", index.source("dense")), ("index.sparse", index.source("sparse")))
    problems = [f"model.path: {cfg.model.path} does not exist"] if missing_local_model(cfg.model.path) else []
    problems += [f"{name}: {value} does not exist" for name, value in named
                 if value and value not in ("artifact", "default") and "://" not in value and not Path(value).exists()]
    cuda = ["model.device"] if cfg.model.device == "cuda" else []
    cuda += [f"{name}.ray_actor_options.num_gpus" for name in ("decoder", "shards", "ingress")
             if float((getattr(cfg, name).ray_actor_options or {}).get("num_gpus") or 0) > 0]
    if cuda:
        try:
            check_device("cuda")
        except ModelLoadError as exc:
            problems += [f"{what}: {exc}" for what in cuda]
    return problems


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def local_torch_threads(cfg) -> int | None:
    """torch threads per decoder replica when this command starts its own local Ray instance and
    model.torch_threads is unset: the machine's cores shared by the fixed number of CPU decoder
    replicas. (Ray would give each replica OMP_NUM_THREADS = its num_cpus, 1 by default: on the
    2-core reference machine one thread serves ~10% fewer tokens/s than two, bench/results/serving.md.)
    None: leave it to Ray (a GPU decoder, autoscaling, or a thread count already set)."""
    import os

    dc = cfg.decoder
    gpu = cfg.model.device == "cuda" or (dc.ray_actor_options or {}).get("num_gpus")
    if cfg.model.torch_threads is not None or dc.autoscaling_config is not None or gpu:
        return None
    return max(1, (os.cpu_count() or 1) // dc.num_replicas)


class StopOnSigterm:
    """SIGTERM stops the server the way Ctrl-C does: KeyboardInterrupt in the main thread, so the
    same ``finally`` shuts the application and the local Ray instance down.

    `install` must run again once ``ray.init`` has returned: ray.init replaces the SIGTERM handler
    with its own (``sys.exit(15)``), and the driver's core worker then puts a native crash handler
    (absl's, the ``*** SIGTERM received at time=...`` stack dump) in front of it. That handler also
    arms a 3 s SIGALRM that aborts the process (SIGABRT) whatever it is doing: a Serve shutdown
    takes longer, so the driver died before ``ray.shutdown()`` and the raylet's agents
    (DashboardAgent, RuntimeEnvAgent) were left running. Python's handler, installed after that,
    replaces the native one for SIGTERM (crashes, SIGSEGV and the like, keep their stack dumps).

    Once the shutdown has begun (`stopping`), a further SIGTERM is ignored so that it completes;
    whoever sent it escalates to SIGKILL after its grace period anyway.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.received = False

    def install(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.stopping:
            print("SIGTERM: already stopping", file=sys.stderr)
            return
        self.stopping = self.received = True
        raise KeyboardInterrupt


def _start_replicas(section) -> int:
    auto = getattr(section, "autoscaling_config", None)
    if auto:
        return max(1, int(auto.get("initial_replicas") or auto.get("min_replicas") or 1))
    return section.num_replicas


def local_ray_cpus(cfg, cores: int | None = None) -> int:
    """Logical CPUs for the local Ray instance: the machine's cores, or the CPUs the app's replicas
    ask for at start if more. Ray's CPUs are scheduling tokens: with the machine's 2 alone, a
    decoder (1), two index shards (0.5 each) and the ingress (0.1) never all got placed and the
    app waited forever; the threads each replica runs are set apart (model.torch_threads)."""
    import math
    import os

    def cpus(section) -> float:
        return _start_replicas(section) * float((section.ray_actor_options or {}).get("num_cpus", 1))

    demand = cpus(cfg.decoder) + cpus(cfg.ingress) + cfg.shards.num_shards * cpus(cfg.shards)
    cores = os.cpu_count() if cores is None else cores
    return max(cores or 1, math.ceil(demand - 1e-9))


def wait_ready(url: str, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                return json.loads(r.read())
        except Exception as exc:
            last = exc
            time.sleep(1.0)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s ({last})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="YAML/JSON file: the app args, or a Serve config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one arg, dotted (e.g. decoder.max_ongoing_requests=8)")
    p.add_argument("--address", default="local",
                   help="Ray cluster address: 'local' (default) starts a new local instance, 'auto' joins a running one")
    p.add_argument("--name", default="sense", help="Serve application name")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the app to be ready")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="Ray dashboard of the local instance (default: only on machines of more than 4 cores)")
    args = p.parse_args(argv)
    sigterm = StopOnSigterm()
    sigterm.install()                                 # before Ray too: the datastores may take minutes
    from serving.config import ServingConfig

    app_args = load_args(args.config, args.set)
    try:                                              # fail fast on a bad configuration, in one line
        cfg = ServingConfig.from_args(app_args)
    except ValueError as exc:                         # (pydantic's ValidationError is one)
        raise SystemExit(f"error: bad configuration: {ServingConfig.problems(exc)}") from None
    from serving.auth import AuthConfigError, load_api_keys

    try:                                              # and on API keys configured but not there
        load_api_keys(cfg.ingress.api_keys_file, cfg.ingress.api_keys_env)
    except AuthConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    missing = local_problems(cfg) if args.address == "local" else []
    if missing:                                       # a local instance's replicas run on this machine
        raise SystemExit(f"error: bad configuration: {'; '.join(missing)}")
    if "default" in (cfg.index.source("sparse"), cfg.index.source("dense")):
        from decoding.target import TargetModel
        from serving.index_data import prepare_defaults

        from decoding.errors import SenseError, one_line
        from index.corpus import CorpusError
        from index.dense_format import DatastoreError
        from index.storage import StorageError

        print("preparing the default GSM8K datastores (built once into the cache; the dense one takes "
              "minutes on a CPU) ...", file=sys.stderr)
        try:
            prepare_defaults(cfg.index, TargetModel.load(cfg.model.path))
        except (SenseError, DatastoreError, CorpusError, StorageError) as exc:
            raise SystemExit(f"error: {one_line(exc)}") from None
    threads = local_torch_threads(cfg) if args.address == "local" else None
    if threads is not None:             # this machine is the decoder's: use its cores, not Ray's 1 per num_cpus
        _merge(app_args, {"model": {"torch_threads": threads}})
        print(f"decoder: {threads} torch thread(s) per replica (set model.torch_threads to change)", file=sys.stderr)
    # Ray is imported once the configuration has been read (a bad one is answered without it).
    import ray
    from ray import serve

    from serving.app import build_app

    if args.address == "local":                       # lean control plane: serving/control_plane.py
        from serving.control_plane import init_local_ray

        init_local_ray(dashboard=args.dashboard, logging_level="WARNING", num_cpus=local_ray_cpus(cfg))
    else:
        ray.init(address=args.address, logging_level="WARNING")
    sigterm.install()                                 # again: ray.init replaced it (see StopOnSigterm)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print("starting the application ...", file=sys.stderr)
        serve.run(build_app(app_args), name=args.name, route_prefix="/", blocking=False)
        url = f"http://{args.host}:{args.port}"
        health = wait_ready(url, args.timeout)
        print(f"SENSE on Ray is serving {health.get('model')} at {url}/v1 (status {health.get('status')})")
        auth = " -H 'Authorization: Bearer <key>'" if cfg.ingress.auth_enabled else ""
        print(f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
              f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is 17 * 23?\"}}], \"max_tokens\": 64}}'")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:                         # Ctrl-C, or SIGTERM (StopOnSigterm)
        print(f"stopping{' (SIGTERM)' if sigterm.received else ''} ...", file=sys.stderr)
    except Exception as exc:                          # the app did not deploy, or did not become ready
        print(f"error: the application did not start: {deploy_failure(args.name) or _first_line(exc)}",
              file=sys.stderr)
        return 1
    finally:
        sigterm.stopping = True                       # a second SIGTERM must not cut the shutdown short
        serve.shutdown()
        ray.shutdown()
    return 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )")     # an exception's module path


def deploy_failure(app_name: str) -> str | None:
    """Why Serve says the application's deployments failed: the last line of each unhealthy
    deployment's message (a replica's exception ends with its own line), or None."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:
        return None
    if app is None:
        return None
    reasons = []
    for name, d in app.deployments.items():
        if str(d.status).endswith(("UNHEALTHY", "DEPLOY_FAILED")) and (d.message or "").strip():
            last = _QUALIFIED.sub("", d.message.strip().splitlines()[-1].strip())    # DatastoreError: ...
            reasons.append(f"{name}: {last}")
    return "; ".join(reasons) or None


if __name__ == "__main__":
    sys.exit(main())
