"""Build an index artifact from a dense datastore with Ray (the work behind ``pipelines.build_index``).

Steps (each Ray task takes one CPU; the driver holds no more than one shard's arrays at a time):

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

Datastore reading and the task bodies: ``index.artifact_tasks``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from index import faiss_ops, storage
from index.artifact import open_shard, open_version, publish_artifact
from index.artifact_format import (FIRST_TOKEN_FILE, MERGED_DATA_FILE, MERGED_INDEX_FILE, TRAINED_FILE,
                                   TRANSFORM_FILE, VALUES_FILE, ArtifactError, ArtifactManifest, DenseShard, FileRef,
                                   SparseShard, dense_shard_file, sha256_bytes, sparse_shard_dir)
from index.artifact_tasks import add_task, check_keys, plan_shards, read_datastore, sample_task, sparse_task
from index.calibration import CALIBRATION_EXCLUDE, CALIBRATION_K, calibrate_nprobe, cross_document_recall
from index.dense_format import DatastoreError, Manifest

TRANSFORM_DESCRIPTION = "z-score (sample mean/std) -> PCA to key_dim -> L2-normalise (index.dense_format.KeyTransform)"
# Where S3 is, never who may read it: a task's runtime_env is visible to anyone with access to the
# cluster's dashboard and state API, so credentials come from each node's own environment
# (instance role, or the variables set where `ray start` ran).
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class BuildConfig:
    """What to build. shards=0: one per cluster CPU, at most one per 25,000 entries."""

    datastore: str
    output: str
    shards: int = 0
    factory: str = "auto"                  # "auto", "Flat", or a FAISS IVF factory string
    nprobe: int | None = None              # None: the smallest reaching target_recall
    target_recall: float = 0.96
    merge: bool = True                     # one merged index, or keep N shards for fan-out serving
    sparse: bool = True                    # also build the REST suffix index
    sparse_shards: int = 1
    sparse_max_suffix: int = 16
    calibration_queries: int = 500
    exact_max: int = faiss_ops.EXACT_MAX   # "auto": Flat up to this many entries
    use_gpu: bool | None = None            # None: train on the GPU if FAISS sees one
    make_current: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.shards < 0 or self.sparse_shards < 1:
            raise ValueError(f"--shards must be >= 0 and --sparse-shards >= 1 "
                             f"(got {self.shards}, {self.sparse_shards})")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {self.nprobe}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if self.calibration_queries < 1:
            raise ValueError(f"calibration_queries must be >= 1, got {self.calibration_queries}")


@dataclass
class BuildResult:
    version_uri: str
    manifest: ArtifactManifest
    seconds: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        size = sum(f.bytes for f in m.files())
        lines = [f"published {self.version_uri}" + (" (CURRENT)" if m.build.get("make_current") else ""),
                 f"  entries {m.entries:,}  documents {m.documents:,}  key_dim {m.key_dim}  value_len {m.value_len}",
                 f"  index {m.factory}  nprobe {m.nprobe}  recall@10 {m.recall_at_10:.3f}  "
                 f"{'merged' if m.merged else f'{len(m.dense_shards)} shards'}  built from {m.build['shards']} shards",
                 f"  sparse {len(m.sparse_shards)} shard(s), "
                 f"{sum(s.n_tokens for s in m.sparse_shards):,} tokens" if m.sparse_shards else "  sparse: none",
                 f"  size {size / 2**20:.1f} MiB ({size / m.entries:.0f} bytes/entry)",
                 "  time " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())]
        return "\n".join(lines)


def _say(msg: str) -> None:
    print(f"[build_index] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# merging (driver side)


@contextlib.contextmanager
def _stdout_to_devnull():
    """Silence file descriptor 1 (C++ prints) for a moment: stdout carries the CLI's summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def merge_dense(staging: Path, shard_files: list[str], *, exact: bool,
                trained: Path | None) -> tuple[FileRef, FileRef | None]:
    """Merge shard index files (relative to staging) into one: an on-disk IVF (header + .ivfdata,
    faiss.contrib.ondisk) or one Flat. Deletes the shard files; returns (index, data) refs."""
    from faiss.contrib.ondisk import merge_ondisk

    paths = [staging / f for f in shard_files]
    if exact:
        merged = faiss_ops.read_index(paths[0], mmap=False)
        for p in paths[1:]:
            merged.merge_from(faiss_ops.read_index(p, mmap=False), 0)
        faiss_ops.write_index(merged, staging / MERGED_INDEX_FILE)
        data = None
    else:
        merged = faiss_ops.read_index(trained, mmap=False)
        (staging / MERGED_DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
        with _stdout_to_devnull():                                    # FAISS prints "resizing ..." there
            merge_ondisk(merged, [str(p) for p in paths], str(staging / MERGED_DATA_FILE))
        faiss_ops.write_index(merged, staging / MERGED_INDEX_FILE)
        data = FileRef.of(staging, MERGED_DATA_FILE)
    del merged
    for p in paths:
        p.unlink()
    return FileRef.of(staging, MERGED_INDEX_FILE), data



# ---------------------------------------------------------------------------------------------
# the build


def _task_error(exc: BaseException) -> BaseException:
    """The original DatastoreError/StorageError/ValueError inside a RayTaskError, if any."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, (DatastoreError, storage.StorageError, ValueError)) else exc


def _default_shards(entries: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, math.ceil(entries / 25_000)))


def _staging_dir(output: str) -> Path:
    """A fresh staging directory: beside the versions for a local output (published by rename)."""
    if storage.is_remote(output):
        return Path(tempfile.mkdtemp(prefix="sense-index-staging-"))
    root = Path(storage.open_fs(output)[1])
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def check_build(config: BuildConfig) -> tuple[Manifest, bytes, str]:
    """Validate the configuration against the datastore before any work: (datastore manifest,
    its bytes, the FAISS factory string to build). Raises DatastoreError/ValueError."""
    config.check()
    ds, ds_raw = read_datastore(config.datastore)
    e, d = ds.entries, ds.key_dim
    factory = faiss_ops.choose_factory(e, d, exact_max=config.exact_max) if config.factory == "auto" else config.factory
    faiss_ops.make_index(factory, d)
    nlist = faiss_ops.parse_nlist(factory)
    if nlist and e < nlist * faiss_ops.MIN_TRAIN_PER_LIST:
        raise ValueError(f"{factory}: {nlist} lists need at least {nlist * faiss_ops.MIN_TRAIN_PER_LIST:,} entries "
                         f"to train (the datastore has {e:,}); use fewer lists or --factory Flat")
    return ds, ds_raw, factory


def build_artifact(config: BuildConfig, progress: Callable[[str], None] | None = _say) -> BuildResult:
    """Build and publish an index artifact on the connected Ray cluster (if Ray is not
    initialised: the one at $RAY_ADDRESS, else a new local one).

    Raises DatastoreError / ArtifactError / StorageError / ValueError (one-line messages) on bad
    input, also when a Ray task hit it."""
    import ray
    from numpy.lib.format import open_memmap

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
    staging = _staging_dir(config.output)
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
            with _stdout_to_devnull():                            # FAISS reports the on-disk file's move
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


def merge_artifact(root: str, *, version: str | None = None, make_current: bool = True,
                   cache_dir: str | None = None, progress: Callable[[str], None] | None = _say) -> str:
    """Publish a merged copy (one on-disk IVF or one Flat) of a sharded artifact version as a new
    version under `root`; returns its URI. Values, transform and sparse files are copied as is."""
    say = progress or (lambda _msg: None)
    _, root_path, manifest, _ = open_version(root, version, lambda m: m.files(), cache_dir, None)
    if manifest.merged:
        raise ArtifactError(f"{root}: this version is already one merged index")
    for ref in manifest.files():
        ref.verify(root_path)
    staging = _staging_dir(root)
    try:
        for ref in manifest.files():
            if ref.path.startswith("dense/shard-"):
                continue
            (staging / ref.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root_path / ref.path, staging / ref.path)
        shard_files = [s.index.path for s in manifest.dense_shards]
        for f in shard_files:
            (staging / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root_path / f, staging / f)
        t = time.time()
        idx_ref, data_ref = merge_dense(staging, shard_files, exact=manifest.nlist == 0,
                                        trained=staging / manifest.trained.path if manifest.trained else None)
        manifest.dense_shards = [DenseShard(0, manifest.entries, idx_ref, data_ref)]
        manifest.merged = True
        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.build = {**manifest.build, "merged_from": len(shard_files), "merge_seconds": round(time.time() - t, 2)}
        uri = publish_artifact(staging, root, manifest, make_current=make_current)
        say(f"merged {len(shard_files)} shards into {uri}")
        return uri
    finally:
        shutil.rmtree(staging, ignore_errors=True)

