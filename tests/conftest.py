"""Shared fixtures: the embedded target model (loaded once per session) and small corpora."""

from __future__ import annotations

import os
import warnings

import pytest

from support.s3 import S3Server

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


# Tiers (README, "Tests"): `make test` runs everything; `make test-fast` leaves out the tests
# marked here from the fixtures they use, and those marked `slow` by hand.
_TIER_FIXTURES = {
    "cluster": {"ray_cluster", "s3_server"},              # a real local Ray cluster or S3 server
    "model": {"target", "target_bf16", "gsm8k_sparse_index", "dense_docs", "dense_store_dir"},   # the embedded model
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _TIER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def target():
    """SmolLM2-135M-Instruct (embedded GGUF), float32 on CPU (explicit: the default, dtype "auto",
    may pick bfloat16 on a CPU with AVX512-BF16)."""
    from decoding.target import TargetModel

    return TargetModel.load(dtype="float32")


@pytest.fixture(scope="session")
def target_bf16():
    """The same model in bfloat16 (the fast dtype on CPUs with AVX512-BF16)."""
    from decoding.target import TargetModel

    return TargetModel.load(dtype="bfloat16")


@pytest.fixture(scope="session")
def gsm8k_sparse_index(target):
    """A REST datastore over the first 2,000 GSM8K train answers."""
    from decoding.demo_stores import encode_text
    from index.corpus import gsm8k_sparse_index

    return gsm8k_sparse_index(encode_text(target), stop=2000)


@pytest.fixture(scope="session")
def dense_docs(target):
    """The first 40 GSM8K train question/answer pairs as chat documents (entries for answers)."""
    from decoding.demo_stores import gsm8k_documents

    return gsm8k_documents(target, 40)


@pytest.fixture(scope="session")
def dense_store_dir(target, dense_docs, tmp_path_factory):
    """A small dense datastore (d = 32, values of 8 tokens, several shards)."""
    from decoding.dense_extract import build_dense_datastore

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
    # Imported here, not at the top: Ray loads only in sessions that use the cluster.
    from support.cluster import shutdown_cluster, start_local_cluster

    # "slot": one per node, so a test can place one actor on each node.
    cluster = start_local_cluster({"head": 1, "slot": 1}, {"worker": 1, "slot": 1})
    cluster.wait_for_job_agent = lambda timeout=120: _wait_for_job_agent(cluster.dashboard_url, timeout)
    try:
        yield cluster
    finally:
        shutdown_cluster(cluster)


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback; its endpoint and credentials are exported to the
    environment (so s3fs in this process and in Ray workers started afterwards reach it)."""
    server = S3Server()
    server.start()
    # On loopback the only failures are the tests' deliberate outages: without the project's own
    # retries on top of s3fs's (storage.retry_delays, tested in test_errors), an outage surfaces in
    # about 12 s per write instead of 38.
    env = {**server.env, "SENSE_STORAGE_RETRY_DELAYS": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
