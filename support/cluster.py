"""A local multi-node Ray cluster on this machine: a head and one worker node, with the dashboard."""

from __future__ import annotations

import ray
from ray import serve
from ray.cluster_utils import Cluster

from support.net import free_port


def start_local_cluster(head_resources: dict, worker_resources: dict, num_cpus: int = 2) -> Cluster:
    """A head and one worker node (`num_cpus` logical CPUs each, the given custom resources) with
    the dashboard; the driver connected. Sets ``cluster.dashboard_url`` (http://127.0.0.1:<port>).

    Each node's dashboard agent gets a port of its own: the default (52365) is shared by every Ray
    instance on the machine, and a second cluster's job agent would fail to bind it."""
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": num_cpus, "include_dashboard": True, "dashboard_port": port, "resources": head_resources,
        "dashboard_agent_listen_port": free_port()})
    cluster.add_node(num_cpus=num_cpus, resources=worker_resources, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    cluster.dashboard_url = f"http://127.0.0.1:{port}"
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    return cluster


def shutdown_cluster(cluster: Cluster) -> None:
    """Serve (if started), the driver's connection, then the cluster's nodes."""
    try:
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    cluster.shutdown()
