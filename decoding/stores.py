"""One loader for the datastores the drafters retrieve from: the CLI, serving and the benchmarks call it.

:func:`load_datastores` returns a ``decoding.methods.Datastores`` (sparse: the REST suffix
index; dense: the FAISS datastore the dense drafter searches). Each kind comes from a *source*:

``"artifact"``
    the published index artifact `index` (what ``pipelines.build_index`` publishes: a root whose
    ``CURRENT`` names the version, or one version directory; a local path or ``s3://``), the
    version `version` (``vNNNN``; None or ``"CURRENT"``: the current one, resolved ONCE, so the
    sparse and the dense store come from the same version);
``"default"``
    the GSM8K train stores (``decoding.demo_stores``), built into the local cache on first use,
    under a file lock (processes on one machine build them once);
a path or URI
    a store folder (``sense build-sparse``, ``sense build-dense``, ``pipelines.build_datastore``)
    or an artifact: its root, one version directory, or -- for the sparse kind -- its ``sparse/``
    folder;
``None``
    not loaded (the methods needing it are unavailable);
``"auto"``
    ``"artifact"`` when `index` is given, else ``"default"``.

Every failure is a one-line ``DatastoreError`` / ``ArtifactError`` / ``SparseIndexError``.
"""

from __future__ import annotations

import json
from pathlib import Path

from decoding.demo_stores import DEFAULT_DENSE_DOCS, default_dense_store, default_sparse_index
from decoding.fingerprint import model_fingerprint
from decoding.methods import Datastores, NEEDS_DENSE, NEEDS_SPARSE
from decoding.model_loader import cache_root
from index import storage
from index.artifact import list_versions, load_artifact, resolve_version
from index.artifact import load_sparse as load_artifact_sparse
from index.artifact_format import ARTIFACT_FORMAT, ArtifactError, CURRENT, MANIFEST, VERSION_RE
from index.dense_store import DenseStore
from index.sparse import META_FILE, SparseIndex, SparseIndexError

SPARSE, DENSE = "sparse", "dense"


def resolve_index(index: str, version: str | None = None) -> str:
    """The version directory of artifact `index` that `version` designates (None, "" or
    "CURRENT": the one CURRENT names; a `index` that is a version directory: itself)."""
    if version in (None, "", CURRENT):
        version = None
    return resolve_version(str(index), version)


def is_artifact(uri: str | Path) -> bool:
    """Whether `uri` is an index artifact: a root (CURRENT, or version directories) or one version
    directory (its manifest.json is an artifact manifest, not a dense datastore's)."""
    uri = str(uri)
    if storage.exists(storage.join(uri, CURRENT)):
        return True
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return bool(list_versions(uri)) and not Path(uri).joinpath(META_FILE).is_file()
    try:
        return json.loads(raw).get("format") == ARTIFACT_FORMAT
    except (ValueError, AttributeError):
        return False


def _artifact_of_sparse_folder(path: str) -> str | None:
    """The artifact version directory whose ``sparse/`` folder `path` is, else None."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if name == "sparse" and parent and is_artifact(parent):
        return parent
    return None


def _source(kind: str, source, index: str | None) -> str | None:
    if source == "auto":
        return "artifact" if index else "default"
    if source == "artifact" and not index:
        raise ArtifactError(f"the {kind} store is to come from the index artifact, but no index URI is given")
    return source


def _default_lock(kind: str):
    """A file lock beside the default stores' cache: processes on one machine build them once."""
    from filelock import FileLock

    path = cache_root() / "datastores" / f".default-{kind}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def load_sparse_store(source, target=None, *, index: str | None = None, version: str | None = None):
    """The REST index from `source` (see the module docstring): SparseIndex, ShardedSparseIndex or None."""
    source = _source(SPARSE, source, index)
    if source is None:
        return None
    if source == "artifact":
        return load_artifact_sparse(resolve_index(index, version))
    if source == "default":
        with _default_lock(SPARSE):
            return default_sparse_index(target)
    path = str(source)
    if not storage.is_remote(path) and Path(path).joinpath(META_FILE).is_file():
        return SparseIndex.load(path)
    if is_artifact(path):
        return load_artifact_sparse(resolve_index(path, version))
    parent = _artifact_of_sparse_folder(path)
    if parent is not None:
        return load_artifact_sparse(parent)
    if storage.is_remote(path) or Path(path).exists():
        raise SparseIndexError(f"{path}: neither a REST datastore ({META_FILE}) nor an index artifact "
                               f"({MANIFEST} or {CURRENT}) nor an artifact's sparse/ folder")
    raise SparseIndexError(f"{path}: no such REST datastore or index artifact")


def load_dense_store(source, target, *, index: str | None = None, version: str | None = None,
                     n_docs: int = DEFAULT_DENSE_DOCS, nprobe: int | None = None):
    """The dense store from `source` (see the module docstring), checked against `target`'s
    fingerprint: DenseStore, IndexArtifact or None. `nprobe`: IVF lists probed per search."""
    source = _source(DENSE, source, index)
    if source is None:
        return None

    if source == "default":
        with _default_lock(f"{DENSE}{n_docs}"):
            store = default_dense_store(target, n_docs=n_docs)
    else:
        expect = model_fingerprint(target)
        if source == "artifact":
            store = load_artifact(resolve_index(index, version), expect)
        elif is_artifact(source):
            store = load_artifact(resolve_index(source, version), expect)
        else:
            store = DenseStore.load(source, expect=expect)
    if nprobe is not None:
        set_nprobe(store, nprobe)
    return store


def set_nprobe(store, nprobe: int) -> None:
    """IVF lists probed per search of a dense store (no effect on an exact index)."""
    if hasattr(store, "shards"):                      # IndexArtifact
        store.nprobe = nprobe
    elif hasattr(store.index, "nprobe"):             # DenseStore with an IVF index
        store.index.nprobe = nprobe


def load_datastores(target=None, *, index: str | None = None, version: str | None = None, sparse="auto",
                    dense="auto", methods=None, dense_default_docs: int = DEFAULT_DENSE_DOCS,
                    nprobe: int | None = None) -> Datastores:
    """The datastores of `methods` (None: both kinds) from their sources (module docstring).

    index/version: the published index artifact (local or s3://) and its version (vNNNN, None or
    "CURRENT"); sparse/dense: each kind's source; target: the TargetModel (dense stores are checked against its fingerprint; the defaults are
    built with it)."""
    want_sparse = methods is None or bool(NEEDS_SPARSE & set(methods))
    want_dense = methods is None or bool(NEEDS_DENSE & set(methods))
    if version not in (None, "", CURRENT) and not VERSION_RE.match(str(version)):
        raise ArtifactError(f"version {version!r} is not a version name (vNNNN) or {CURRENT}")
    if version not in (None, "", CURRENT) and not index:
        raise ArtifactError(f"a version ({version}) is given without an index artifact URI")
    if index and ((want_sparse and _source(SPARSE, sparse, index) == "artifact")
                  or (want_dense and _source(DENSE, dense, index) == "artifact")):
        index, version = resolve_index(index, version), None     # one version for both kinds
    stores = Datastores()
    if want_sparse:
        stores.sparse = load_sparse_store(sparse, target, index=index, version=version)
    if want_dense:
        stores.dense = load_dense_store(dense, target, index=index, version=version, n_docs=dense_default_docs,
                                        nprobe=nprobe)
    return stores
