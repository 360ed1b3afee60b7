"""Shared fixtures: the embedded target model (loaded once per session) and small corpora."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


# Tiers (README, "Tests"): `make test` runs everything; `make test-fast` leaves out the tests
# marked here from the fixtures they use, and those marked `slow` by hand.
_TIER_FIXTURES = {
    "cluster": {"ray_cluster", "s3_server"},              # a real local Ray cluster or S3 server
    "model": {"target", "gsm8k_sparse_index", "dense_docs", "dense_store_dir"},   # the embedded model
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _TIER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def target():
    """SmolLM2-135M-Instruct (embedded GGUF), float32 on CPU."""
    from decoding.target import TargetModel

    return TargetModel.load()


@pytest.fixture(scope="session")
def gsm8k_sparse_index(target):
    """A REST datastore over the first 2,000 GSM8K train answers."""
    from index.corpus import gsm8k, gsm8k_answer_text
    from index.sparse import SparseIndex

    docs = [target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"] for r in gsm8k("train")[:2000]]
    return SparseIndex.build(docs)


@pytest.fixture(scope="session")
def dense_docs(target):
    """The first 40 GSM8K train question/answer pairs as chat documents (entries for answers)."""
    from index.defaults import gsm8k_documents

    return gsm8k_documents(target, 40)


@pytest.fixture(scope="session")
def dense_store_dir(target, dense_docs, tmp_path_factory):
    """A small dense datastore (d = 32, values of 8 tokens, several shards)."""
    from index.dense_build import build_dense_datastore

    path = tmp_path_factory.mktemp("dense") / "store"
    build_dense_datastore(target, dense_docs, path, dim=32, value_len=8, shard_rows=1500)
    return path


def tiny_llama(vocab: int = 8, seed: int = 0, scale: float = 4.0):
    """A random 2-layer Llama with a small vocabulary, for exact-distribution tests.

    `scale` sharpens the output distribution so that drafts are accepted often.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local multi-node Ray cluster: a head and one worker node (2 logical CPUs each) on
    this machine, with the dashboard's job server. Yields the cluster; the driver is connected.
    Its nodes start with the S3 server's endpoint and credentials in their environment, as cloud
    nodes would have theirs.

    Attributes used by tests: `address` (GCS), `dashboard_url` (http://127.0.0.1:<port>).
    Serve on it is started by tests/test_serving.py's start_serve: one HTTP proxy, on the head node
    (its nodes share this machine: proxies on several would share the port).
    """
    import ray
    from ray.cluster_utils import Cluster

    port = _free_port()
    # Own ports for the dashboard agents: the default (52365) is shared by every Ray instance on
    # the machine, and a second cluster's job agent would fail to bind it.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": port, "resources": {"head": 1, "slot": 1},
        "dashboard_agent_listen_port": _free_port()})
    # "slot": one per node, so a test can place one actor on each node.
    cluster.add_node(num_cpus=2, resources={"worker": 1, "slot": 1}, dashboard_agent_listen_port=_free_port())
    cluster.wait_for_nodes()
    cluster.dashboard_url = f"http://127.0.0.1:{port}"
    cluster.wait_for_job_agent = lambda timeout=120: _wait_for_job_agent(cluster.dashboard_url, timeout)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield cluster
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


def _wait_for_job_agent(url: str, timeout: float) -> None:
    """Block until the head's job agent accepts submissions (it registers some seconds after the
    dashboard answers): submit a no-op job until it is taken, then wait for it."""
    import time

    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            client = JobSubmissionClient(url)
            job = client.submit_job(entrypoint="true")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)
    while str(client.get_job_status(job)) not in ("SUCCEEDED", "FAILED", "STOPPED", "JobStatus.SUCCEEDED",
                                                   "JobStatus.FAILED", "JobStatus.STOPPED"):
        if time.time() > deadline:
            raise TimeoutError("the no-op job did not finish")
        time.sleep(0.5)


class S3Server:
    """moto's standalone S3-compatible HTTP server in a subprocess on loopback.

    `env` holds the variables that point boto3/s3fs at it; `stop()`/`start()` simulate an outage
    (moto keeps no state across restarts)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_ENDPOINT_URL_S3": self.endpoint}
        self.proc = None

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback; its endpoint and credentials are exported to the
    environment (so s3fs in this process and in Ray workers started afterwards reach it)."""
    server = S3Server()
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
