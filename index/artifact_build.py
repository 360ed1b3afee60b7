"""The Ray-free side of the index artifact build: what to build (``BuildConfig``, checked against
the datastore by ``check_build`` before any work), what came out (``BuildResult``), the staging
directory, merging shard indexes into one (``merge_dense``) and ``merge_artifact``, which merges
a published sharded version into a new one in this process.

The build itself (Ray tasks over the datastore, then merging, calibrating nprobe and publishing)
is the driver ``pipelines.build_index.build_artifact``; the task bodies are ``index.artifact_tasks``.
"""

from __future__ import annotations

import contextlib
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

from index import faiss_ops, storage
from index.artifact import check_artifact_root, open_version, publish_artifact
from index.artifact_format import (MERGED_DATA_FILE, MERGED_INDEX_FILE, ArtifactError, ArtifactManifest, DenseShard,
                                   FileRef)
from index.artifact_tasks import read_datastore
from index.dense_format import Manifest

TRANSFORM_DESCRIPTION = "z-score (sample mean/std) -> PCA to key_dim -> L2-normalise (index.dense_format.KeyTransform)"


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


def progress_line(msg: str) -> None:
    print(f"[build_index] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# merging (driver side)


@contextlib.contextmanager
def stdout_to_devnull():
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
    from faiss.contrib.ondisk import merge_ondisk    # faiss loads on first use, as in index.faiss_ops

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
        with stdout_to_devnull():                                    # FAISS prints "resizing ..." there
            merge_ondisk(merged, [str(p) for p in paths], str(staging / MERGED_DATA_FILE))
        faiss_ops.write_index(merged, staging / MERGED_INDEX_FILE)
        data = FileRef.of(staging, MERGED_DATA_FILE)
    del merged
    for p in paths:
        p.unlink()
    return FileRef.of(staging, MERGED_INDEX_FILE), data


# ---------------------------------------------------------------------------------------------
# staging and checks


def staging_dir(output: str) -> Path:
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
    check_artifact_root(config.output)
    ds, ds_raw = read_datastore(config.datastore)
    e, d = ds.entries, ds.key_dim
    factory = faiss_ops.choose_factory(e, d, exact_max=config.exact_max) if config.factory == "auto" else config.factory
    faiss_ops.make_index(factory, d)
    nlist = faiss_ops.parse_nlist(factory)
    if nlist and e < nlist * faiss_ops.MIN_TRAIN_PER_LIST:
        raise ValueError(f"{factory}: {nlist} lists need at least {nlist * faiss_ops.MIN_TRAIN_PER_LIST:,} entries "
                         f"to train (the datastore has {e:,}); use fewer lists or --factory Flat")
    return ds, ds_raw, factory


def merge_artifact(root: str, *, version: str | None = None, make_current: bool = True,
                   cache_dir: str | None = None, progress: Callable[[str], None] | None = progress_line) -> str:
    """Publish a merged copy (one on-disk IVF or one Flat) of a sharded artifact version as a new
    version under `root`; returns its URI. Values, transform and sparse files are copied as is."""
    say = progress or (lambda _msg: None)
    _, root_path, manifest, _ = open_version(root, version, lambda m: m.files(), cache_dir, None)
    if manifest.merged:
        raise ArtifactError(f"{root}: this version is already one merged index")
    for ref in manifest.files():
        ref.verify(root_path)
    staging = staging_dir(root)
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

