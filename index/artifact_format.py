"""The index artifact contract: what ``pipelines.build_index`` writes and serving loads.

An artifact root holds versions side by side and a pointer to the current one:

    <root>/CURRENT                 "v0002\\n", written atomically after the version is complete
    <root>/v0001/ ...              an older version, still loadable by name
    <root>/v0002/
        manifest.json              written last: a version directory without it is not an artifact
        transform.npz              the datastore's key transform (z-score, PCA, L2-normalise)
        values.npy                 [E, N] int32, the next N tokens of entry e (np.load(mmap_mode="r"))
        first_token.npy            [E] int32, values[:, 0] (the DReSD first-token filter)
        dense/trained.faiss        the trained, empty index (IVF only): add to it, merge with it
        dense/shard-00000.faiss    N shards with GLOBAL ids, or one merged index:
        dense/index.faiss          ... merged IVF header, and
        dense/index.ivfdata        ... its inverted lists (FAISS on-disk format, memory-mapped)
        sparse/shard-00000/        REST suffix index(es) of the same token streams
            tokens.npy, suffix_array.npy, meta.json

Entry ids are global and dense: 0..E-1 in datastore order (its Parquet shards in manifest order,
rows in file order), so ``values[id]`` and ``first_token[id]`` belong to the neighbour ``id``.

Every file is listed in the manifest with its size and sha256; every path is relative to the
version directory and may not leave it (absolute paths, ``..`` and backslashes are refused).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from index.dense_format import DatastoreError, ModelFingerprint, check_compatible, sha256_file

ARTIFACT_FORMAT = "sense-index-artifact"
ARTIFACT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
VERSION_RE = re.compile(r"^v(\d{4,})$")

TRANSFORM_FILE = "transform.npz"
VALUES_FILE = "values.npy"
FIRST_TOKEN_FILE = "first_token.npy"
TRAINED_FILE = "dense/trained.faiss"
MERGED_INDEX_FILE = "dense/index.faiss"
MERGED_DATA_FILE = "dense/index.ivfdata"


class ArtifactError(DatastoreError):
    """An index artifact is missing, incomplete, corrupt, unsafe, or built for another model.

    Messages are one line and name the file at fault; the CLI prints them without a traceback."""


def dense_shard_file(i: int) -> str:
    return f"dense/shard-{i:05d}.faiss"


def sparse_shard_dir(i: int) -> str:
    return f"sparse/shard-{i:05d}"


def version_name(n: int) -> str:
    return f"v{n:04d}"


def safe_relpath(path: object, where: str = "manifest") -> str:
    """Return `path` if it is a plain relative POSIX path inside the artifact, else raise.

    Refused: non-strings, empty paths, absolute paths, drive letters, backslashes, ``.``/``..``
    components. (Symlinks are checked again when the file is opened, see `resolve_inside`.)"""
    if not isinstance(path, str) or not path:
        raise ArtifactError(f"{where}: file path {path!r} is not a non-empty string")
    p = PurePosixPath(path)
    if p.is_absolute() or "\\" in path or ":" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ArtifactError(f"{where}: file path {path!r} would leave the artifact directory: refused")
    return path


def resolve_inside(root: Path, relpath: str, where: str = "manifest") -> Path:
    """root / relpath, refusing paths that escape `root` (also through symlinks)."""
    safe_relpath(relpath, where)
    path = Path(root) / relpath
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"{where}: file path {relpath!r} points outside the artifact directory: refused")
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path, chunk: int = 1 << 22) -> str:
    return sha256_file(path, chunk)


@dataclass(frozen=True)
class FileRef:
    """One file of the artifact: relative path, size in bytes, sha256 of the content."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, root: Path, relpath: str) -> "FileRef":
        path = Path(root) / relpath
        return cls(relpath, path.stat().st_size, sha256_path(path))

    def verify(self, root: Path, *, checksum: bool = True) -> Path:
        """The local path of this file after checking that it is inside `root`, present, of the
        recorded size and (with `checksum`) of the recorded sha256."""
        path = resolve_inside(root, self.path)
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != self.bytes:
            raise ArtifactError(f"{path}: {size} bytes, the manifest says {self.bytes} (truncated or replaced)")
        if checksum and sha256_path(path) != self.sha256:
            raise ArtifactError(f"{path}: sha256 mismatch (corrupt or replaced)")
        return path


@dataclass(frozen=True)
class DenseShard:
    """Entries id_start .. id_start+rows-1 (global ids) in one FAISS index file; `data` is the
    on-disk inverted-list file of a merged IVF index (None otherwise)."""

    id_start: int
    rows: int
    index: FileRef
    data: FileRef | None = None


@dataclass(frozen=True)
class SparseShard:
    """One REST suffix index (index.sparse.SparseIndex directory) over a subset of documents."""

    dir: str
    n_tokens: int
    n_docs: int
    files: tuple[FileRef, ...]


@dataclass
class ArtifactManifest:
    """manifest.json of one artifact version. Shapes: values [entries, value_len] int32,
    first_token [entries] int32, keys [entries, key_dim] float32 unit-norm (inside FAISS)."""

    fingerprint: ModelFingerprint
    layer: int
    key_dim: int
    value_len: int
    eos_token_id: int
    entries: int
    documents: int
    tokens: int
    transform: str                          # what the key transform does
    factory: str                            # FAISS index_factory string, e.g. "IVF1024,Flat"
    metric: str                             # "inner_product" (keys are unit-norm: cosine)
    nlist: int                              # IVF lists (0 for Flat)
    nprobe: int                             # lists probed per query (1 for Flat)
    merged: bool                            # one merged index, or N shards for fan-out serving
    recall_at_10: float                     # measured at build time against exact search (1.0 for Flat)
    transform_file: FileRef
    values: FileRef
    first_token: FileRef
    dense_shards: list[DenseShard]
    trained: FileRef | None = None
    sparse_shards: list[SparseShard] = field(default_factory=list)
    sparse_max_suffix: int = 0
    datastore: dict = field(default_factory=dict)     # {"uri", "manifest_sha256", "corpora", "shards"}
    build: dict = field(default_factory=dict)         # how it was built (informational)
    created: str = ""
    format: str = ARTIFACT_FORMAT
    format_version: int = ARTIFACT_FORMAT_VERSION

    # -- the files ---------------------------------------------------------------------------

    def files(self) -> list[FileRef]:
        """Every file of the artifact (manifest excluded)."""
        out = [self.transform_file, self.values, self.first_token]
        if self.trained is not None:
            out.append(self.trained)
        for s in self.dense_shards:
            out += [s.index] + ([s.data] if s.data is not None else [])
        for s in self.sparse_shards:
            out += list(s.files)
        return out

    def shard_files(self, i: int) -> list[FileRef]:
        s = self.dense_shards[i]
        return [s.index] + ([s.data] if s.data is not None else [])

    def check_compatible(self, fingerprint: ModelFingerprint) -> None:
        """Refuse an artifact built for another model weights, tokenizer or hidden layer."""
        try:
            check_compatible(self, fingerprint)
        except ArtifactError:
            raise
        except DatastoreError as exc:
            raise ArtifactError(str(exc).replace("datastore", "index artifact")) from None

    # -- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> "ArtifactManifest":
        """Parse and validate; every problem is an ArtifactError naming `where`."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{where}: not JSON ({exc})") from None
        if isinstance(raw, dict) and "format" not in raw and {"key_dim", "shards", "transform_sha256"} <= raw.keys():
            raise ArtifactError(f"{where}: a dense datastore's manifest, not an index artifact's: give the datastore "
                                f"as a dense store (sense --dense-store, serving index.dense), or publish an artifact "
                                f"from it with python -m pipelines.build_index")
        if not isinstance(raw, dict) or raw.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{where}: not an index artifact manifest (format {raw.get('format')!r})"
                                if isinstance(raw, dict) else f"{where}: not an index artifact manifest")
        if raw.get("format_version") != ARTIFACT_FORMAT_VERSION:
            raise ArtifactError(f"{where}: artifact format version {raw.get('format_version')!r}, "
                                f"this code reads {ARTIFACT_FORMAT_VERSION}: rebuild the index")
        try:
            known = {f.name for f in fields(cls)}
            raw = {k: v for k, v in raw.items() if k in known}
            raw["fingerprint"] = ModelFingerprint(**raw["fingerprint"])
            for key in ("transform_file", "values", "first_token"):
                raw[key] = _file_ref(raw[key], where)
            raw["trained"] = _file_ref(raw["trained"], where) if raw.get("trained") else None
            raw["dense_shards"] = [DenseShard(id_start=int(s["id_start"]), rows=int(s["rows"]),
                                              index=_file_ref(s["index"], where),
                                              data=_file_ref(s["data"], where) if s.get("data") else None)
                                   for s in raw["dense_shards"]]
            raw["sparse_shards"] = [SparseShard(dir=safe_relpath(s["dir"], where), n_tokens=int(s["n_tokens"]),
                                                n_docs=int(s["n_docs"]),
                                                files=tuple(_file_ref(f, where) for f in s["files"]))
                                    for s in raw.get("sparse_shards", [])]
            manifest = cls(**raw)
        except ArtifactError:
            raise
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ArtifactError(f"{where}: not a valid index artifact manifest ({type(exc).__name__}: {exc})") from None
        manifest.validate(where)
        return manifest

    def validate(self, where: str = "manifest") -> None:
        """Internal consistency: shard id ranges tile 0..entries-1, sizes and dims are sane."""
        if self.entries < 1 or self.key_dim < 1 or self.value_len < 1:
            raise ArtifactError(f"{where}: entries, key_dim and value_len must be positive")
        if self.layer != self.fingerprint.layer:
            raise ArtifactError(f"{where}: layer {self.layer} differs from the fingerprint's {self.fingerprint.layer}")
        if not self.dense_shards:
            raise ArtifactError(f"{where}: no dense shards")
        start = 0
        for i, s in enumerate(self.dense_shards):
            if s.id_start != start or s.rows < 1:
                raise ArtifactError(f"{where}: dense shard {i} covers ids {s.id_start}..+{s.rows}, expected to "
                                    f"start at {start}: shards must tile the ids")
            start += s.rows
        if start != self.entries:
            raise ArtifactError(f"{where}: dense shards hold {start} entries, the manifest says {self.entries}")
        if self.nprobe < 1 or self.nlist < 0:
            raise ArtifactError(f"{where}: nprobe must be >= 1 and nlist >= 0")
        paths = [f.path for f in self.files()]
        if len(set(paths)) != len(paths):
            raise ArtifactError(f"{where}: a file is listed twice")
        for s in self.sparse_shards:
            if any(f.path.rsplit("/", 1)[0] != s.dir for f in s.files):
                raise ArtifactError(f"{where}: sparse shard {s.dir!r} lists files outside its directory")


def _file_ref(raw: dict, where: str) -> FileRef:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: a file entry is not an object ({raw!r})")
    path = safe_relpath(raw.get("path"), where)
    size, digest = raw.get("bytes"), raw.get("sha256")
    valid_digest = isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)
    if not isinstance(size, int) or size < 0 or not valid_digest:
        raise ArtifactError(f"{where}: file entry {path!r} lacks a valid size or sha256")
    return FileRef(path, size, digest)
