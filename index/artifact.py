"""Load and publish index artifacts (format: ``index.artifact_format``; builder: ``pipelines.build_index``).

Public API (used by the dense drafter and by the Ray Serve index-shard deployments):

``load_artifact(uri, expect=None, *, version=None, cache_dir=None, verify=True, load_index=True)``
    -> `IndexArtifact`: the object the dense drafter takes as its store. ``.transform``
    (KeyTransform), ``.manifest`` (ArtifactManifest: ``.eos_token_id``, ``.fingerprint``,
    ``.factory``, ``.nprobe``, ...), ``len()``, ``.search(queries [n, d] float32, k) -> (sims
    [n, k] float32, ids [n, k] int64 global, -1 = none)`` over all shards (one merged index, or
    the shards fanned out in-process and merged with `merge_topk`), ``.values`` [E, N] int32 and
    ``.first_token`` [E] int32 memory-mapped and indexable by those ids, ``.sparse`` (the REST
    index of the same token streams, loaded on first use), ``.shards`` (the `ShardSearcher`s).
    ``load_index=False`` skips the FAISS files (a front end that only needs values/transform).
``load_shard(uri, i, expect=None, ...)`` -> `ShardSearcher` with ``.search(queries, k)`` returning
    GLOBAL ids, ``.id_start``, ``.rows``, ``.nprobe``; only that shard's files are fetched.
``merge_topk([(sims, ids), ...], k) -> (sims, ids)``: pure function, global top-k of per-shard
    results (ties to the smaller id; missing = -1 / -inf).
``load_sparse(uri, ...)`` -> ``index.sparse.SparseIndex`` (one shard) or
    ``index.sparse_shards.ShardedSparseIndex``, both with ``.lookup``.
``publish_artifact(staging_dir, root, manifest, *, make_current=True) -> version URI``: copy a
    complete staged artifact to ``<root>/vNNNN/`` (manifest.json last), then point
    ``<root>/CURRENT`` at it (atomically, last).
``list_versions(root)``, ``resolve_version(uri, version=None)``, ``set_current(root, version)``,
``read_artifact_manifest(version_uri)``.

`uri` is a local path or ``s3://bucket/prefix``, either an artifact root (CURRENT is followed)
or one version directory. Remote artifacts are downloaded once into a local cache
(``$SENSE_CACHE_DIR/index-artifacts``, keyed by URI and manifest hash), checksum-verified, then
memory-mapped. Every failure -- missing, incomplete, corrupt or truncated files, paths leaving
the artifact, another model (``expect``, a ModelFingerprint) -- raises `ArtifactError` (a
``DatastoreError``) with a one-line message.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index import faiss_ops, storage
from index.cache import cache_root
from index.artifact_format import (CURRENT, MANIFEST, VERSION_RE, ArtifactError, ArtifactManifest, DenseShard,
                                   FileRef, sha256_bytes, version_name)
from index.dense_format import DatastoreError, KeyTransform, ModelFingerprint
from index.faiss_ops import merge_topk

__all__ = ["ArtifactError", "ArtifactManifest", "IndexArtifact", "ShardSearcher", "load_artifact", "load_shard",
           "load_sparse", "merge_topk", "publish_artifact", "list_versions", "resolve_version", "set_current",
           "read_artifact_manifest", "default_cache_dir"]


# ---------------------------------------------------------------------------------------------
# versions


def list_versions(root: str | Path) -> list[str]:
    """Version directory names under `root` (complete or not), oldest first."""
    names = storage.list_names(root) or []
    return sorted((n for n in names if VERSION_RE.match(n)), key=lambda n: int(n[1:]))


def check_artifact_root(root: str | Path) -> None:
    """Raise ArtifactError unless `root` can take a new version: absent, an empty folder, or an
    artifact root (version folders, CURRENT, hidden staging). A file, a version folder itself, or
    a folder of other things (the datastore, a home directory) is refused before any work, so that
    versions never land among files that are not the artifact's."""
    names = storage.list_names(root)
    if names is None:
        raise ArtifactError(f"{root} is a file: --output names the folder the artifact's versions go in")
    if MANIFEST in names:
        raise ArtifactError(f"{root} holds a {MANIFEST} (a datastore, or one version of an artifact): --output "
                            f"names an artifact's root folder; choose a new one, or the root the version is in")
    other = [n for n in names if not (VERSION_RE.match(n) or n == CURRENT or n.startswith("."))]
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ArtifactError(f"{root} holds other files ({shown}): not an index artifact root; choose a new or "
                            f"empty folder")


def resolve_version(uri: str | Path, version: str | None = None) -> str:
    """The version directory `uri` designates: `uri` itself if it holds a manifest.json,
    else `<uri>/<version>` or the version named by `<uri>/CURRENT`."""
    uri = str(uri)
    if version is not None:
        if not VERSION_RE.match(version):
            raise ArtifactError(f"version {version!r} is not a version name (vNNNN)")
        versions = list_versions(uri)
        if version not in versions:
            raise ArtifactError(f"{uri} has no version {version} ("
                                + (f"its versions: {', '.join(versions)})" if versions else "it holds none)"))
        return storage.join(uri, version)
    if storage.exists(storage.join(uri, MANIFEST)):
        return uri
    pointer = storage.join(uri, CURRENT)
    try:
        name = storage.read_bytes(pointer).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        raise ArtifactError(f"{uri}: neither {MANIFEST} nor {CURRENT}: not an index artifact "
                            f"(or its build did not finish)") from None
    if not VERSION_RE.match(name):
        raise ArtifactError(f"{pointer}: names {name[:40]!r}, not a version directory (vNNNN): refused")
    return storage.join(uri, name)


def read_artifact_manifest(version_uri: str | Path) -> tuple[ArtifactManifest, bytes]:
    """(manifest, its raw bytes) of one version directory."""
    path = storage.join(version_uri, MANIFEST)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise ArtifactError(f"{version_uri}: no {MANIFEST}: not an index artifact version, "
                            f"or its publication did not finish") from None
    return ArtifactManifest.from_json(raw, where=str(path)), raw


def set_current(root: str | Path, version: str) -> None:
    """Point `<root>/CURRENT` at `version` (one atomic write; the version must be complete)."""
    if not VERSION_RE.match(version):
        raise ArtifactError(f"version {version!r} is not a version name (vNNNN)")
    if not storage.exists(storage.join(root, version, MANIFEST)):
        raise ArtifactError(f"{storage.join(root, version)}: no {MANIFEST}: refusing to make it current")
    storage.write_bytes_atomic(storage.join(root, CURRENT), f"{version}\n".encode())


# ---------------------------------------------------------------------------------------------
# publishing


def _write_manifest(path: Path, manifest: ArtifactManifest) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish_artifact(staging: str | Path, root: str | Path, manifest: ArtifactManifest, *,
                     make_current: bool = True) -> str:
    """Publish the staged artifact in the local directory `staging` (every file of `manifest`,
    at its relative path) as the next version under `root`; returns the version's URI.

    Local root: the version is assembled in a hidden sibling and renamed into place, so it
    appears complete at once (the manifest is written last before that). S3 root: the files are
    uploaded, then manifest.json, then CURRENT; a reader never sees a manifest before all the
    files it lists. One publisher per S3 root at a time (version numbers are not locked there).
    """
    staging = Path(staging)
    manifest.validate(str(staging))
    for ref in manifest.files():
        ref.verify(staging, checksum=False)
    root = str(root)
    if storage.is_remote(root):
        versions = list_versions(root)
        name = version_name(int(versions[-1][1:]) + 1 if versions else 1)
        target = storage.join(root, name)
        for ref in sorted(manifest.files(), key=lambda r: -r.bytes):
            storage.upload_file(staging / ref.path, storage.join(target, ref.path))
        storage.write_bytes_atomic(storage.join(target, MANIFEST), manifest.to_json().encode())
    else:
        root_path = Path(storage.open_fs(root)[1])
        root_path.mkdir(parents=True, exist_ok=True)
        src = staging
        if staging.resolve().parent != root_path.resolve():              # maybe another filesystem
            src = root_path / f".publish-{uuid.uuid4().hex[:12]}"
            shutil.copytree(staging, src)
        try:
            _write_manifest(src / MANIFEST, manifest)
            while True:                                                   # reserve a number (mkdir is exclusive)
                versions = list_versions(root_path)
                name = version_name(int(versions[-1][1:]) + 1 if versions else 1)
                try:
                    (root_path / name).mkdir()
                    break
                except FileExistsError:
                    continue
            os.rename(src, root_path / name)                              # replaces the empty reservation
        finally:
            if src != staging and src.exists():
                shutil.rmtree(src, ignore_errors=True)
        target = str(root_path / name)
    if make_current:
        set_current(root, name)
    return target


# ---------------------------------------------------------------------------------------------
# local cache for remote artifacts


def default_cache_dir() -> Path:
    return cache_root() / "index-artifacts"


def _localize(version_uri: str, manifest: ArtifactManifest, raw_manifest: bytes, files: list[FileRef],
              cache_dir: str | Path | None) -> Path:
    """Download `files` of a remote version into the cache (skipping ones already there and
    intact), verifying sizes and checksums; returns the local version directory."""
    from filelock import FileLock

    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    local = base / f"{sha256_bytes(version_uri.encode())[:16]}-{sha256_bytes(raw_manifest)[:16]}"
    local.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        for ref in files:
            try:
                ref.verify(local)
                continue                                      # cached and intact
            except ArtifactError:
                pass
            try:
                storage.download_file(storage.join(version_uri, ref.path), local / ref.path)
            except FileNotFoundError:
                where = storage.join(version_uri, ref.path)
                raise ArtifactError(f"{where}: listed in the manifest but missing") from None
            ref.verify(local)
        if not (local / MANIFEST).is_file():
            storage.write_bytes_atomic(local / MANIFEST, raw_manifest)
    return local


def open_version(uri: str | Path, version: str | None, files_of, cache_dir, expect: ModelFingerprint | None):
    """(version URI, local version dir, manifest, whether its files were verified already) for a
    local or remote URI; `files_of(manifest)` lists the files the caller will open (downloaded
    into the cache when remote)."""
    version_uri = resolve_version(uri, version)
    manifest, raw = read_artifact_manifest(version_uri)
    if expect is not None:
        manifest.check_compatible(expect)
    if storage.is_remote(version_uri):
        return version_uri, _localize(version_uri, manifest, raw, files_of(manifest), cache_dir), manifest, True
    return version_uri, Path(storage.open_fs(version_uri)[1]), manifest, False


# ---------------------------------------------------------------------------------------------
# loaded objects


class ShardSearcher:
    """One dense FAISS shard of an artifact: `search` returns GLOBAL ids (id_start .. +rows-1)."""

    def __init__(self, index, *, shard: int, id_start: int, rows: int, dim: int, nprobe: int) -> None:
        self.index, self.shard, self.id_start, self.rows, self.dim = index, shard, id_start, rows, dim
        self.nprobe = nprobe

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        faiss_ops.set_nprobe(self.index, int(value))
        self._nprobe = int(value)

    def __len__(self) -> int:
        return self.rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [n, d] float32 -> (sims [n, k] float32, ids [n, k] int64 global; -1 = none)."""
        return faiss_ops.search(self.index, faiss_ops.check_queries(queries, self.dim), k)

    def __repr__(self) -> str:
        return f"ShardSearcher({self.shard}, ids {self.id_start}..{self.id_start + self.rows - 1}, nprobe={self.nprobe})"


def open_shard(root: Path, manifest: ArtifactManifest, i: int, *, checksum: bool, mmap: bool) -> ShardSearcher:
    s: DenseShard = manifest.dense_shards[i]
    path = s.index.verify(root, checksum=checksum)
    if s.data is not None:
        data = s.data.verify(root, checksum=checksum)
        if data.parent != path.parent:
            raise ArtifactError(f"{root}: shard {i}'s inverted lists {s.data.path!r} must sit beside its index file")
    # Memory-mapped only when large (faiss_ops.IN_MEMORY_MAX): searches through mapped lists are slow.
    size = path.stat().st_size + (data.stat().st_size if s.data is not None else 0)
    try:
        index = faiss_ops.read_index(path, ondisk=s.data is not None, exact=manifest.nlist == 0,
                                     mmap=mmap and size > faiss_ops.IN_MEMORY_MAX)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: unreadable FAISS index ({str(exc).strip().splitlines()[-1][:200]})") from None
    if index.ntotal != s.rows or index.d != manifest.key_dim:
        raise ArtifactError(f"{path}: {index.ntotal} entries of dimension {index.d}, the manifest says "
                            f"{s.rows} of dimension {manifest.key_dim}")
    return ShardSearcher(index, shard=i, id_start=s.id_start, rows=s.rows, dim=manifest.key_dim, nprobe=manifest.nprobe)


def _load_array(root: Path, ref: FileRef, shape: tuple[int, ...], *, checksum: bool, mmap: bool) -> np.ndarray:
    path = ref.verify(root, checksum=checksum)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:                   # numpy raises ValueError/OSError/EOFError on bad files
        raise ArtifactError(f"{path}: unreadable array ({type(exc).__name__}: {exc})") from None
    if arr.dtype != np.int32 or arr.shape != shape:
        raise ArtifactError(f"{path}: {arr.dtype} {arr.shape}, the manifest implies int32 {shape}")
    return arr


def _load_transform(root: Path, manifest: ArtifactManifest, *, checksum: bool) -> KeyTransform:
    path = manifest.transform_file.verify(root, checksum=checksum)
    try:
        transform = KeyTransform.load(path)
    except DatastoreError as exc:
        raise ArtifactError(str(exc)) from None
    if transform.dim != manifest.key_dim:
        raise ArtifactError(f"{path}: transform to {transform.dim} dims, the manifest says {manifest.key_dim}")
    return transform


def _open_sparse(root: Path, manifest: ArtifactManifest, *, checksum: bool):
    from index.sparse import SparseIndex, SparseIndexError
    from index.sparse_shards import ShardedSparseIndex

    if not manifest.sparse_shards:
        raise ArtifactError(f"{root}: this artifact has no sparse (REST) index (built with --no-sparse)")
    shards = []
    for s in manifest.sparse_shards:
        for ref in s.files:
            ref.verify(root, checksum=checksum)
        try:
            idx = SparseIndex.load(root / s.dir, mmap=True)
        except SparseIndexError as exc:
            raise ArtifactError(str(exc)) from None
        if idx.n_tokens != s.n_tokens or idx.n_docs != s.n_docs:
            raise ArtifactError(f"{root / s.dir}: {idx.n_tokens} tokens in {idx.n_docs} documents, "
                                f"the manifest says {s.n_tokens} in {s.n_docs}")
        shards.append(idx)
    return shards[0] if len(shards) == 1 else ShardedSparseIndex(shards)


@dataclass
class IndexArtifact:
    """A loaded artifact version: the dense drafter's store (see the module docstring).

    uri: the version directory (CURRENT resolved); root: its local copy. values [E, N] int32 and
    first_token [E] int32 are read-only memory maps indexed by global id."""

    uri: str
    root: Path
    manifest: ArtifactManifest
    transform: KeyTransform
    values: np.ndarray
    first_token: np.ndarray
    shards: list[ShardSearcher] = field(default_factory=list)
    _checksum: bool = field(default=True, repr=False)

    def __len__(self) -> int:
        return self.manifest.entries

    @property
    def nprobe(self) -> int:
        return self.shards[0].nprobe if self.shards else self.manifest.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for s in self.shards:
            s.nprobe = value

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner-product top-k of [n, d] float32 queries over all shards:
        (sims [n, k] float32, ids [n, k] int64 global; -1 = none)."""
        if not self.shards:
            raise ArtifactError(f"{self.uri}: loaded with load_index=False: no FAISS index to search")
        if len(self.shards) == 1:
            return self.shards[0].search(queries, k)
        return merge_topk([s.search(queries, k) for s in self.shards], k)

    @functools.cached_property
    def sparse(self):
        """The REST suffix index of the same token streams (SparseIndex or ShardedSparseIndex)."""
        return _open_sparse(self.root, self.manifest, checksum=self._checksum)


def load_artifact(uri: str | Path, expect: ModelFingerprint | None = None, *, version: str | None = None,
                  cache_dir: str | Path | None = None, verify: bool = True, load_index: bool = True,
                  mmap: bool = True) -> IndexArtifact:
    """Load an artifact (root or version directory, local or s3://) for searching.

    expect: refuse an artifact built for another model/tokenizer/layer. verify: sha256 every
    file opened (sizes are always checked). mmap: memory-map values, first_token and a FAISS
    index file larger than ``faiss_ops.IN_MEMORY_MAX`` (its inverted lists / flat codes) instead
    of reading them into memory; a smaller index is read into memory either way."""

    def files_of(m: ArtifactManifest) -> list[FileRef]:
        out = [m.transform_file, m.values, m.first_token]
        if load_index:
            out += [f for i in range(len(m.dense_shards)) for f in m.shard_files(i)]
        return out + [f for s in m.sparse_shards for f in s.files]

    version_uri, root, manifest, fetched = open_version(uri, version, files_of, cache_dir, expect)
    checksum = verify and not fetched                      # fetched files were verified on download
    e, n = manifest.entries, manifest.value_len
    artifact = IndexArtifact(
        uri=version_uri, root=root, manifest=manifest,
        transform=_load_transform(root, manifest, checksum=checksum),
        values=_load_array(root, manifest.values, (e, n), checksum=checksum, mmap=mmap),
        first_token=_load_array(root, manifest.first_token, (e,), checksum=checksum, mmap=mmap),
        _checksum=checksum)
    if load_index:
        artifact.shards = [open_shard(root, manifest, i, checksum=checksum, mmap=mmap)
                           for i in range(len(manifest.dense_shards))]
    return artifact


def load_shard(uri: str | Path, i: int, expect: ModelFingerprint | None = None, *, version: str | None = None,
               cache_dir: str | Path | None = None, verify: bool = True, mmap: bool = True) -> ShardSearcher:
    """Load dense shard `i` of an artifact alone (a merged artifact has one shard, 0)."""

    def files_of(m: ArtifactManifest) -> list[FileRef]:
        if not 0 <= i < len(m.dense_shards):
            raise ArtifactError(f"{uri}: shard {i} requested, the artifact has {len(m.dense_shards)}")
        return m.shard_files(i)

    _, root, manifest, fetched = open_version(uri, version, files_of, cache_dir, expect)
    files_of(manifest)
    return open_shard(root, manifest, i, checksum=verify and not fetched, mmap=mmap)


def load_sparse(uri: str | Path, *, version: str | None = None, cache_dir: str | Path | None = None,
                verify: bool = True):
    """The artifact's REST index: SparseIndex (one shard) or ShardedSparseIndex, memory-mapped."""
    _, root, manifest, fetched = open_version(uri, version, lambda m: [f for s in m.sparse_shards for f in s.files],
                                               cache_dir, None)
    return _open_sparse(root, manifest, checksum=verify and not fetched)
