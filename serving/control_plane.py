"""Ray's own background work on the machine that also decodes.

A local Ray node with the app deployed and idle keeps about 0.29 of a core busy on the 2-core
reference machine (bench/results/serving.md): the Serve controller runs its control loop every
0.1 s, every replica and proxy exports cached metrics every 0.1 s, and the dashboard polls the GCS.
The decoder shares those cores, so on a small machine that is ~15% of its compute. The settings
here halve it (0.16 of a core measured, same machine): a 1 s control loop (deployments, health
and autoscaling decisions react up to a second later; autoscaling looks back 30 s anyway), a 1 s
metrics export, and no dashboard on machines of 4 cores or fewer (`ray job submit` and
`serve status` need it: keep it with ``--dashboard``).

They only apply to a Ray instance that this process starts (environment variables are read by
the raylet and the workers it forks). For a cluster started with ``ray start``, set the same
variables in the nodes' environment (the manifests in cluster_configs/ leave Ray's defaults: their
decoders have cores or GPUs of their own). A value already in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

LEAN_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",       # Serve controller loop (Ray's default 0.1)
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",   # replicas' and proxies' metrics export (default 100)
}
SMALL_MACHINE_CORES = 4


def apply_lean_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the `LEAN_ENV` variables not already set; returns the ones it set."""
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in LEAN_ENV.items() if k not in env}
    env.update(applied)
    return applied


def want_dashboard(requested: bool | None, cores: int | None = None) -> bool:
    """The dashboard of a local instance: as requested, else only beside more than 4 cores."""
    if requested is not None:
        return requested
    cores = os.cpu_count() if cores is None else cores
    return (cores or 1) > SMALL_MACHINE_CORES


def init_local_ray(*, dashboard: bool | None = None, **kwargs):
    """``ray.init(address="local")`` with the lean settings above; kwargs go to ray.init."""
    import ray

    apply_lean_env()
    return ray.init(address="local", include_dashboard=want_dashboard(dashboard), **kwargs)
