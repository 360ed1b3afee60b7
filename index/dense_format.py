"""The dense datastore contract shared by the builders, the index and serving.

A datastore is a directory:

    manifest.json          written last, atomically: a directory without it is not a datastore
    transform.npz          z-score mean/std and PCA components (the key transform)
    shards/<name>.parquet  one row per corpus position t
    tokens/<name>.parquet  (optional) the documents' token streams, for the sparse (REST) index:
                           ``doc_id`` (int64), ``tokens`` (list of int32), ``store_from`` (int32),
                           ``corpus`` (string)

Row columns: ``key`` (fixed-size list of float32, d = 64 by default) = transform(h_t), h_t the
target's hidden state at the chosen layer having read tokens 1..t; ``value`` (fixed-size list of
int32, N = 20 by default) = the next N tokens, padded with EOS; ``first_token`` (int32, value[0]);
``doc_id`` (int64); ``position`` (int32, t within the document); ``corpus`` (string).
The transform: z-score with a sample's mean/std, PCA to d dimensions, L2-normalisation.
Every builder writes these files through ``index.dense_writer``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRANSFORM = "transform.npz"


class DatastoreError(ValueError):
    """A datastore is missing, incomplete, corrupt, or built for another model."""


@dataclass
class KeyTransform:
    """z-score -> PCA to d -> L2-normalise. mean/std: [H]; components: [d, H]."""

    mean: np.ndarray
    std: np.ndarray
    components: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, sample: np.ndarray, dim: int = 64, eps: float = 1e-6) -> "KeyTransform":
        """Fit on hidden states [S, H] (S >= dim rows)."""
        sample = np.asarray(sample, dtype=np.float64)
        if sample.ndim != 2:
            raise ValueError(f"expected a [S, H] sample, got shape {sample.shape}")
        s, h = sample.shape
        if not 1 <= dim <= h:
            raise DatastoreError(f"a key dimension of {dim} does not fit the model's hidden size {h}: choose 1-{h}")
        if s < dim:
            raise DatastoreError(f"the corpus has {s} positions, fewer than the key dimension {dim}: add "
                                 f"documents or choose a smaller dimension")
        mean = sample.mean(0)
        std = sample.std(0) + eps
        z = (sample - mean) / std
        z -= z.mean(0)
        # Principal directions: right singular vectors of the centred, z-scored sample.
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        comps = vt[:dim]
        # Fix each direction's sign (its largest-magnitude weight positive): SVD signs are arbitrary,
        # and builders that see the same sample in another order must produce the same keys.
        signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        return cls(mean.astype(np.float32), std.astype(np.float32), comps.astype(np.float32))

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """[..., H] -> [..., d] float32, unit L2 norm."""
        z = (np.asarray(hidden, dtype=np.float32) - self.mean) / self.std
        k = z @ self.components.T
        norm = np.linalg.norm(k, axis=-1, keepdims=True)
        return (k / np.maximum(norm, 1e-12)).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, std=self.std, components=self.components)

    @classmethod
    def load(cls, path: Path) -> "KeyTransform":
        try:
            with np.load(path) as z:
                return cls(z["mean"], z["std"], z["components"])
        except (OSError, KeyError, ValueError) as exc:
            raise DatastoreError(f"{path}: unreadable key transform ({exc})") from None


@dataclass
class ModelFingerprint:
    """What a datastore's keys depend on: the model's weights, its tokenizer and the layer
    (computed from a loaded target by ``decoding.fingerprint.model_fingerprint``)."""

    model_id: str
    weights_hash: str
    tokenizer_hash: str
    layer: int


@dataclass
class Manifest:
    fingerprint: ModelFingerprint
    key_dim: int
    value_len: int
    eos_token_id: int
    entries: int = 0
    documents: int = 0
    tokens: int = 0
    corpora: list[str] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)     # {"path", "rows", "sha256"}
    transform_sha256: str = ""
    skipped: int = 0
    skipped_reasons: dict = field(default_factory=dict)  # reason -> count of bad records
    token_shards: list[dict] = field(default_factory=list)  # {"path", "rows", "sha256"}: token streams
    build: dict = field(default_factory=dict)            # how it was built (config, time, throughput)
    key_dtype: str = ""                                  # the dtype the target ran in for the keys
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise DatastoreError(f"{where}: format version {raw.get('format_version')!r}, "
                                     f"this code reads {FORMAT_VERSION}")
            raw["fingerprint"] = ModelFingerprint(**raw["fingerprint"])
            return cls(**raw)
        except DatastoreError:
            raise
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise DatastoreError(f"{where}: not a valid datastore manifest ({exc})") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_compatible(manifest: Manifest, fingerprint: ModelFingerprint) -> None:
    """Refuse a datastore whose keys come from another model, tokenizer or layer."""
    ours, theirs = fingerprint, manifest.fingerprint
    for what, a, b in (("model weights", ours.weights_hash, theirs.weights_hash),
                       ("tokenizer", ours.tokenizer_hash, theirs.tokenizer_hash),
                       ("hidden layer", ours.layer, theirs.layer)):
        if a != b:
            raise DatastoreError(
                f"this datastore was built for another {what} ({theirs.model_id!r}, {what} {b!r}); "
                f"the loaded target has {what} {a!r}: rebuild the datastore for this model")


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatastoreError(f"{root}: no {MANIFEST}: not a datastore, or its build did not finish")
    return Manifest.from_json(path.read_text(), where=str(path))
