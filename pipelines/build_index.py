"""Build the serving index artifact from a dense datastore, on Ray.

    python -m pipelines.build_index --datastore DIR_OR_S3 --output DIR_OR_S3 [--shards N]
        [--factory auto|Flat|IVF4096,Flat|IVF65536,SQ8|OPQ32_64,IVF65536,PQ32] [--nprobe N] [--merge/--no-merge]
        [--sparse/--no-sparse] [--sparse-shards N] [--ray-address ADDR]

Runs locally (joins the cluster at --ray-address or $RAY_ADDRESS, else starts a local Ray) or as
a job: ``ray job submit --working-dir . -- python -m pipelines.build_index ...``. Progress lines
go to stderr, a summary to stdout; bad input prints one line on stderr and exits with status 2.
See ``index.artifact`` for the artifact layout and the loader API.

Steps of ``build_artifact`` (each Ray task takes one CPU; the driver holds no more than one
shard's arrays at a time):

1. read the datastore manifest (local or s3://) and plan N index shards = contiguous global id
   ranges over its Parquet files (ids: datastore order, as ``DenseStore.load`` numbers them);
2. IVF only: sample keys in parallel (one task per shard), train the index ONCE on the sample in
   the driver (k-means on the GPU when FAISS sees one);
3. add the shards in parallel: each task verifies its Parquet files' sha256, adds its keys to a
   copy of the trained index with global ids, returns the index bytes, its values/first_token
   and the exact top-k of a few calibration queries over its keys; meanwhile other tasks build
   the REST suffix index(es) from the same rows (doc_id, position, first_token);
4. the driver writes values.npy / first_token.npy (memory-mapped, by global id), merges the
   shards into one on-disk IVF (faiss.contrib.ondisk.merge_ondisk) or keeps them for fan-out,
   picks the smallest nprobe whose recall@10 against exact search reaches `target_recall`
   (``index.calibration``), and publishes the version (manifest last, then CURRENT).

The Ray-free pieces (config, checks, merging): ``index.artifact_build``; datastore reading and
the task bodies: ``index.artifact_tasks``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import ray
from numpy.lib.format import open_memmap

from decoding.errors import run_command
from index import faiss_ops, storage
from index.artifact import open_shard, publish_artifact
from index.artifact_build import (TRANSFORM_DESCRIPTION, BuildConfig, BuildResult, check_build, merge_dense,
                                  progress_line, staging_dir, stdout_to_devnull)
from index.artifact_format import (FIRST_TOKEN_FILE, TRAINED_FILE, TRANSFORM_FILE, VALUES_FILE, ArtifactManifest,
                                   DenseShard, FileRef, SparseShard, dense_shard_file, sha256_bytes, sparse_shard_dir)
from index.artifact_tasks import add_task, check_keys, plan_shards, sample_task, sparse_task
from index.calibration import CALIBRATION_EXCLUDE, CALIBRATION_K, calibrate_nprobe, cross_document_recall
from index.dense_format import DatastoreError
from index.storage import StorageError

# Where S3 is, never who may read it: a task's runtime_env is visible to anyone with access to the
# cluster's dashboard and state API, so credentials come from each node's own environment
# (instance role, or the variables set where `ray start` ran).
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def _task_error(exc: BaseException) -> BaseException:
    """The original DatastoreError/StorageError/ValueError inside a RayTaskError, if any."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (DatastoreError, storage.StorageError, ValueError)) else exc


def _default_shards(entries: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, math.ceil(entries / 25_000)))


def build_artifact(config: BuildConfig, progress: Callable[[str], None] | None = progress_line) -> BuildResult:
    """Build and publish an index artifact on the connected Ray cluster (if Ray is not
    initialised: the one at $RAY_ADDRESS, else a new local one).

    Raises DatastoreError / ArtifactError / StorageError / ValueError (one-line messages) on bad
    input, also when a Ray task hit it."""
    say = progress or (lambda _msg: None)
    t_start = time.time()
    seconds: dict[str, float] = {}
    ds, ds_raw, factory = check_build(config)
    e, d, n_val = ds.entries, ds.key_dim, ds.value_len
    nlist, exact = faiss_ops.parse_nlist(factory), faiss_ops.is_exact(factory)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="ERROR")
    n_shards = config.shards or _default_shards(e)
    plan = plan_shards([int(s["rows"]) for s in ds.shards], n_shards)
    n_shards = len(plan)
    say(f"datastore {config.datastore}: {e:,} entries, {ds.documents:,} documents, {len(ds.shards)} Parquet files; "
        f"index {factory} over {n_shards} shard(s)")

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} if storage.is_remote(config.datastore) else {}
    opts = {"num_cpus": 1, "max_retries": 1, **({"runtime_env": {"env_vars": env}} if env else {})}
    r_sample = ray.remote(sample_task).options(**opts)
    r_add = ray.remote(add_task).options(**opts)
    r_sparse = ray.remote(sparse_task).options(**opts)
    shards_ref = ray.put(ds.shards)
    staging = staging_dir(config.output)
    try:
        # 1. sparse tasks start now: they only need the rows
        token_shards = list(getattr(ds, "token_shards", None) or [])
        sparse_refs = [r_sparse.remote(config.datastore, shards_ref, token_shards, s, config.sparse_shards,
                                       config.sparse_max_suffix)
                       for s in range(config.sparse_shards)] if config.sparse else []

        # 2. sample and train (IVF), pick calibration queries
        t = time.time()
        index = faiss_ops.make_index(factory, d)
        queries = query_docs = None
        if not exact:
            want = faiss_ops.training_size(factory, e)
            n_cal = min(config.calibration_queries, max(1, e // 10))
            rate = min(1.0, 1.2 * (want + n_cal) / e)
            got = ray.get([r_sample.remote(config.datastore, shards_ref, pieces, start, d, rate, config.seed + i)
                           for i, (start, pieces) in enumerate(plan)])
            sample = np.concatenate([g[0] for g in got])
            sample_docs = np.concatenate([g[2] for g in got])
            check_keys(sample, config.datastore)
            order = np.random.default_rng(config.seed).permutation(len(sample))
            queries, query_docs = sample[order[:n_cal]], sample_docs[order[:n_cal]]
            train = sample[order[n_cal:n_cal + want]] if len(sample) > n_cal + want // 2 else sample[order[:want]]
            say(f"sampled {len(sample):,} keys ({time.time() - t:.1f}s); training {factory} on {len(train):,}")
            faiss_ops.train_index(index, train, seed=config.seed, use_gpu=config.use_gpu)
            faiss_ops.write_index(index, staging / TRAINED_FILE)
            seconds["train"] = time.time() - t
            say(f"trained {factory} ({seconds['train']:.1f}s)")
        trained_ref = ray.put(faiss_ops.serialize(index))
        queries_ref, query_docs_ref = ray.put(queries), ray.put(query_docs)

        # 3. add the shards in parallel; the driver streams their values into memory-mapped arrays
        t = time.time()
        values = open_memmap(staging / VALUES_FILE, mode="w+", dtype=np.int32, shape=(e, n_val))
        first = open_memmap(staging / FIRST_TOKEN_FILE, mode="w+", dtype=np.int32, shape=(e,))
        doc_of = None if exact else open_memmap(staging / ".doc_id.npy", mode="w+", dtype=np.int64, shape=(e,))
        refs = {r_add.remote(config.datastore, shards_ref, pieces, start, d, n_val, trained_ref, queries_ref,
                             query_docs_ref, CALIBRATION_K): i
                for i, (start, pieces) in enumerate(plan)}
        truths: list = [None] * n_shards
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            out = ray.get(ready[0])
            start = plan[i][0]
            rows = len(out["values"])
            values[start:start + rows] = out["values"]
            first[start:start + rows] = out["first_token"]
            if doc_of is not None:
                doc_of[start:start + rows] = out["doc_id"]
            path = staging / dense_shard_file(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(out["index"].tobytes())
            truths[i] = out["truth"]
            del out
            say(f"shard {n_shards - len(pending)}/{n_shards} added (#{i}: ids {start:,}..{start + rows - 1:,})")
        values.flush()
        first.flush()
        del values, first
        seconds["add"] = time.time() - t

        # 4. transform, merge
        transform_bytes = storage.read_bytes(storage.join(config.datastore, "transform.npz"))
        if sha256_bytes(transform_bytes) != ds.transform_sha256:
            raise DatastoreError(f"{storage.join(config.datastore, 'transform.npz')}: sha256 mismatch with the "
                                 f"datastore manifest (corrupt or replaced)")
        (staging / TRANSFORM_FILE).write_bytes(transform_bytes)
        t = time.time()
        if config.merge and n_shards > 1:
            idx_ref, data_ref = merge_dense(staging, [dense_shard_file(i) for i in range(n_shards)], exact=exact,
                                            trained=None if exact else staging / TRAINED_FILE)
            dense = [DenseShard(0, e, idx_ref, data_ref)]
            seconds["merge"] = time.time() - t
            say(f"merged {n_shards} shards into one {'on-disk IVF' if not exact else 'Flat'} index "
                f"({seconds['merge']:.1f}s)")
        else:
            dense = [DenseShard(start, sum(p.hi - p.lo for p in pieces), FileRef.of(staging, dense_shard_file(i)))
                     for i, (start, pieces) in enumerate(plan)]

        # 5. sparse
        sparse = []
        for s, ref in enumerate(sparse_refs):
            out = ray.get(ref)
            rel = sparse_shard_dir(s)
            (staging / rel).mkdir(parents=True, exist_ok=True)
            for name, data in sorted(out["files"].items()):
                (staging / rel / name).write_bytes(data)
            sparse.append(SparseShard(rel, out["n_tokens"], out["n_docs"],
                                      tuple(FileRef.of(staging, f"{rel}/{name}") for name in sorted(out["files"]))))
        if sparse:
            say(f"sparse index: {sum(s.n_tokens for s in sparse):,} tokens in {len(sparse)} shard(s)")

        manifest = ArtifactManifest(
            fingerprint=ds.fingerprint, layer=ds.fingerprint.layer, key_dim=d, value_len=n_val,
            eos_token_id=ds.eos_token_id, entries=e, documents=ds.documents, tokens=ds.tokens,
            transform=TRANSFORM_DESCRIPTION, factory=factory, metric="inner_product", nlist=nlist,
            nprobe=1, merged=len(dense) == 1, recall_at_10=1.0,
            transform_file=FileRef.of(staging, TRANSFORM_FILE), values=FileRef.of(staging, VALUES_FILE),
            first_token=FileRef.of(staging, FIRST_TOKEN_FILE), dense_shards=dense,
            trained=None if exact else FileRef.of(staging, TRAINED_FILE), sparse_shards=sparse,
            sparse_max_suffix=config.sparse_max_suffix if sparse else 0,
            datastore={"uri": config.datastore, "manifest_sha256": sha256_bytes(ds_raw), "corpora": ds.corpora,
                       "files": len(ds.shards)},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

        # 6. nprobe: given, or the smallest reaching the target recall (exact search: 1)
        if not exact:
            with stdout_to_devnull():                            # FAISS reports the on-disk file's move
                opened = [open_shard(staging, manifest, i, checksum=False, mmap=True) for i in range(len(dense))]

            def search(q, k):
                return faiss_ops.merge_topk([s.search(q, k) for s in opened], k)

            def set_nprobe(p):
                for s in opened:
                    s.nprobe = p

            truth = faiss_ops.merge_topk([tr for tr in truths if tr is not None], CALIBRATION_K)[1]

            def recall_of(found):
                return cross_document_recall(found, truth, query_docs, doc_of)

            t = time.time()
            if config.nprobe is None:
                manifest.nprobe, manifest.recall_at_10 = calibrate_nprobe(
                    search, set_nprobe, nlist, queries, recall_of, config.target_recall)
            else:
                manifest.nprobe = min(config.nprobe, nlist)
                set_nprobe(manifest.nprobe)
                manifest.recall_at_10 = recall_of(search(queries, CALIBRATION_K + CALIBRATION_EXCLUDE)[1])
            del opened, doc_of
            (staging / ".doc_id.npy").unlink()
            seconds["calibrate"] = time.time() - t
            say(f"nprobe {manifest.nprobe}: recall@10 {manifest.recall_at_10:.3f} against exact search "
                f"({len(queries)} queries, neighbours from other documents)")
        seconds["total"] = time.time() - t_start
        manifest.build = {"shards": n_shards, "sparse_shards": len(sparse), "target_recall": config.target_recall,
                          "seconds": {k: round(v, 2) for k, v in seconds.items()}, "make_current": config.make_current,
                          "gpu": bool(config.use_gpu is not False and faiss_ops.gpu_count() > 0)}

        # 7. publish
        version_uri = publish_artifact(staging, config.output, manifest, make_current=config.make_current)
        return BuildResult(version_uri, manifest, seconds)
    except ray.exceptions.RayTaskError as exc:
        raise _task_error(exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.build_index", description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="dense datastore directory or s3:// URI")
    p.add_argument("--output", required=True, help="artifact root (local directory or s3:// URI); "
                   "the build is published as the next version <output>/vNNNN and made CURRENT")
    p.add_argument("--shards", type=int, default=0, help="index shards built in parallel (default: one per "
                   "cluster CPU, at most one per 25,000 entries)")
    p.add_argument("--factory", default="auto", help="FAISS factory: auto (Flat up to 50,000 entries, "
                   "IVF<4*sqrt(E)>,Flat up to 50M, IVF<4*sqrt(E)>,SQ8 above), Flat, or an IVF string "
                   "(e.g. IVF4096,PQ32 or OPQ32_64,IVF4096,PQ32)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: the smallest "
                   "reaching --target-recall against exact search)")
    p.add_argument("--target-recall", type=float, default=0.96, help="recall@10 the nprobe calibration aims at")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the shards into one index (--no-merge: keep them for fan-out serving)")
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="also build the REST suffix index from the same token streams")
    p.add_argument("--sparse-shards", type=int, default=1)
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the GPU (default: when FAISS sees one)")
    p.add_argument("--no-current", action="store_true", help="publish the version without making it CURRENT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = BuildConfig(datastore=args.datastore, output=args.output, shards=args.shards, factory=args.factory,
                         nprobe=args.nprobe, target_recall=args.target_recall, merge=args.merge, sparse=args.sparse,
                         sparse_shards=args.sparse_shards, use_gpu=args.gpu, make_current=not args.no_current,
                         seed=args.seed)
    def body() -> int:
        check_build(config)                              # fail fast, before starting Ray
        if not ray.is_initialized():
            # Never join a cluster by accident (ray.init() alone picks up any cluster on the machine).
            ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "local", logging_level="ERROR")
        print(build_artifact(config).summary())
        return 0

    return run_command(body, (DatastoreError, StorageError, ValueError, ConnectionError), prefix="build_index: error: ",
                       interrupted="build_index: interrupted")


if __name__ == "__main__":
    sys.exit(main())
