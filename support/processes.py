"""The Serve processes of an app on a local cluster, and their resident memory."""

from __future__ import annotations

import psutil
from ray.util.state import list_actors


def serve_processes(dashboard_url: str, app: str) -> dict[str, list[dict]]:
    """Alive Serve actors of `app` by role ("Decoder", "Ingress", "IndexShard0", ..., "proxy"),
    each {"name", "pid", "node_id"}, from Ray's state API on this cluster's dashboard (the address
    is explicit: another local cluster must never be picked up)."""
    out: dict[str, list[dict]] = {}
    prefix = f"ServeReplica:{app}:"
    for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, limit=10000,
                         raise_on_missing_output=False):
        cls = a["class_name"] or ""
        role = cls[len(prefix):] if cls.startswith(prefix) else "proxy" if cls == "ProxyActor" else None
        if role is not None and a.get("pid"):
            out.setdefault(role, []).append({"name": a["name"], "pid": a["pid"], "node_id": a.get("node_id")})
    return out


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together, in MiB (a process gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def memory(dashboard_url: str, app: str) -> dict[str, float]:
    """Resident MiB of the app's decoder replicas, ingress replicas and HTTP proxies."""
    procs = serve_processes(dashboard_url, app)
    return {"decoder": rss_mb([p["pid"] for p in procs.get("Decoder", [])]),
            "ingress": rss_mb([p["pid"] for p in procs.get("Ingress", [])]),
            "proxy": rss_mb([p["pid"] for p in procs.get("proxy", [])])}


def kv_bytes_per_token(target) -> int:
    """Bytes of KV cache one token costs the target model (keys and values, every layer, float32)."""
    cfg = target.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4
