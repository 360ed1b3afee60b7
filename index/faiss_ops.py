"""FAISS building blocks for the index artifact: factory choice, training, files, top-k merging.

All indexes use inner product on unit-norm keys (cosine similarity) and carry GLOBAL entry ids
(IVF natively via add_with_ids, Flat inside an IDMap), so shards can be searched independently
and merged with `merge_topk`, or merged on disk into one IVF (faiss.contrib.ondisk).

Search results follow one convention everywhere: sims [n, k] float32 descending, ids [n, k]
int64; a missing neighbour (fewer than k found) is id -1 with similarity -inf.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# Up to this many keys an exact (Flat) index, above an IVF. The limit is set by a decode step's
# one-query search, right after a forward has pushed the keys out of the CPU caches: a Flat scan
# then reads every key from memory (24k keys: 0.55 ms a step, 2-core Zen 3), an IVF in memory a
# few lists (0.05 ms; over 48k keys Flat took 1.1 ms). The same limit for every builder
# (index.dense_store too).
EXACT_MAX = 16_384
# A FAISS index file up to this size is read into memory; a larger one stays memory-mapped. A
# search through mapped or on-disk inverted lists paid about 0.06 ms a probed list (24k keys,
# nprobe 16: 1.1 ms against 0.05 ms in memory, 2-core Zen 3): a tenth of a decode step.
IN_MEMORY_MAX = 2 << 30
SQ8_ABOVE = 50_000_000      # above this many keys, IVF-Flat (4d+8 bytes/entry) gives way to SQ8 codes (d+8)
HNSW_COARSE_FROM = 16_384   # from this many lists, the coarse quantizer is an HNSW graph, not a flat scan
MIN_TRAIN_PER_LIST = 40     # FAISS k-means wants >= 39 training points per centroid
TRAIN_PER_LIST = 64


def _faiss():
    import faiss

    return faiss


def pow2_nlist(entries: int) -> int:
    """Inverted lists for an IVF over `entries` keys, for every builder (artifacts and local dense
    stores): about 4 * sqrt(E) rounded to a power of two, at least 16, halved while the keys would
    give a list fewer than MIN_TRAIN_PER_LIST to train on (just above EXACT_MAX, 4 sqrt(E) lists
    would ask for more keys than there are)."""
    nlist = int(max(16, 2 ** round(np.log2(4 * np.sqrt(max(entries, 1))))))
    while nlist > 1 and nlist * MIN_TRAIN_PER_LIST > entries:
        nlist //= 2
    return nlist


def choose_factory(entries: int, dim: int, *, exact_max: int = EXACT_MAX, sq8_above: int = SQ8_ABOVE) -> str:
    """FAISS factory string by size: "Flat" (exact) up to `exact_max` keys, "IVF<nlist>,Flat" up
    to `sq8_above`, then "IVF<nlist>,SQ8" (8-bit scalar codes: a quarter of the bytes); nlist about
    4 sqrt(E), and from HNSW_COARSE_FROM lists the centroids are searched with HNSW ("IVF<nlist>_HNSW32").

    PQ codes ("IVF<nlist>,PQ<m>", optionally "OPQ<m>_<d>,...") are smaller still but lose too much
    recall on these keys (recall@10 ~0.8 with PQ32 at d=64, see bench/results/index.md) while the
    values ([E, N] int32, 4N bytes/entry) dominate memory by then anyway: ask for them explicitly."""
    if entries <= exact_max:
        return "Flat"
    nlist = pow2_nlist(entries)
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist >= HNSW_COARSE_FROM else "")
    return f"{coarse},Flat" if entries <= sq8_above else f"{coarse},SQ8"


def parse_nlist(factory: str) -> int:
    """Number of IVF lists in a factory string, 0 for a non-IVF (exact) index."""
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def is_exact(factory: str) -> bool:
    return factory.strip() == "Flat"


def training_size(factory: str, entries: int) -> int:
    """How many keys to train on: TRAIN_PER_LIST per IVF list (and >= 10,000 for PQ codebooks)."""
    nlist = parse_nlist(factory)
    if nlist == 0:
        return 0
    want = TRAIN_PER_LIST * nlist
    if "PQ" in factory:
        want = max(want, 256 * MIN_TRAIN_PER_LIST)
    return min(entries, want)


def make_index(factory: str, dim: int):
    """An empty inner-product index; Flat is wrapped in an IDMap so that it stores global ids."""
    faiss = _faiss()
    if is_exact(factory):
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"FAISS factory {factory!r} is not valid for dimension {dim} "
                         f"({str(exc).strip().splitlines()[-1]})") from None
    if parse_nlist(factory) == 0:
        raise ValueError(f"factory {factory!r}: use 'Flat' (exact) or an IVF index ('IVF<nlist>,Flat|PQ<m>')")
    return index


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def train_index(index, sample: np.ndarray, *, seed: int = 0, use_gpu: bool | None = None) -> None:
    """Train an IVF index on a sample [S, d] of unit keys; k-means on the GPU(s) when asked for
    (use_gpu=True) or when available (None) -- the trained index stays a CPU index either way."""
    faiss = _faiss()
    if index.is_trained:
        return
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    gpus = gpu_count()
    if use_gpu and gpus == 0:
        raise ValueError("use_gpu=True but FAISS sees no GPU (install faiss-gpu)")
    if (use_gpu or use_gpu is None) and gpus > 0:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(sample)
    ivf.clustering_index = None


def set_nprobe(index, nprobe: int) -> None:
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return                          # exact index: nothing to probe
    ivf.nprobe = int(min(max(1, nprobe), ivf.nlist))
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):          # an HNSW coarse quantizer must look wider than nprobe
        quantizer.hnsw.efSearch = max(64, 2 * ivf.nprobe)


def serialize(index) -> np.ndarray:
    return _faiss().serialize_index(index)


def deserialize(data: np.ndarray):
    return _faiss().deserialize_index(np.asarray(data))


def write_index(index, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(index, str(path))


def read_index(path: Path, *, ondisk: bool = False, exact: bool = False, mmap: bool = True):
    """Read an index file: IVF inverted lists and Flat codes memory-mapped (mmap=True) or read
    into memory, a merged on-disk IVF with its .ivfdata looked up beside the header (never at the
    recorded path; with mmap=False its lists are then copied into memory)."""
    faiss = _faiss()
    if ondisk:
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        if not mmap:
            lists_into_memory(index)
        return index
    flags = 0 if not mmap else faiss.IO_FLAG_MMAP_IFC if exact else faiss.IO_FLAG_MMAP
    return faiss.read_index(str(path), flags)


def lists_into_memory(index) -> None:
    """Replace an IVF index's inverted lists (on disk, memory-mapped) by an in-memory copy."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    src = ivf.invlists
    dst = faiss.ArrayInvertedLists(src.nlist, src.code_size)
    for i in range(src.nlist):
        n = src.list_size(i)
        if n:
            dst.add_entries(i, n, src.get_ids(i), src.get_codes(i))
    ivf.replace_invlists(dst, True)
    dst.this.disown()           # the index owns it now


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """[n, d] (or [d]) -> contiguous float32 [n, d]; a wrong shape is a ValueError."""
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape [n, {dim}], got {np.shape(queries)}")
    return q


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search with the module's convention (missing neighbours: id -1, sim -inf)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims, ids = index.search(queries, k)
    sims = sims.astype(np.float32, copy=False)
    sims[ids < 0] = -np.inf
    return sims, ids.astype(np.int64, copy=False)


def merge_topk(results, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into one global top-k (fan-out serving).

    results: a sequence of (sims [n, k_i], ids [n, k_i]) with the same n, ids global and disjoint
    across shards, -1 for none. Returns (sims [n, k] float32, ids [n, k] int64), best first; ties
    go to the smaller id; missing neighbours are id -1 with similarity -inf.
    """
    results = list(results)
    if not results:
        raise ValueError("merge_topk needs at least one (sims, ids) pair")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = [np.atleast_2d(np.asarray(s, dtype=np.float32)) for s, _ in results]
    ids = [np.atleast_2d(np.asarray(i, dtype=np.int64)) for _, i in results]
    n = sims[0].shape[0]
    for j, (s, i) in enumerate(zip(sims, ids)):
        if s.shape != i.shape or s.shape[0] != n:
            raise ValueError(f"merge_topk: shard {j} has sims {s.shape} and ids {i.shape}; expected [{n}, k_i] both")
    s, i = np.concatenate(sims, axis=1), np.concatenate(ids, axis=1)
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    i = np.where(i < 0, np.iinfo(np.int64).max, i)          # missing ones sort last among equal -inf
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    i = np.where(np.isneginf(s) | (i == np.iinfo(np.int64).max), -1, i)
    if s.shape[1] < k:                                       # fewer candidates than k in all
        pad = k - s.shape[1]
        s = np.concatenate([s, np.full((n, pad), -np.inf, np.float32)], axis=1)
        i = np.concatenate([i, np.full((n, pad), -1, np.int64)], axis=1)
    return s, i


def exact_topk(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of queries [q, d] over keys [m, d] with global ids [m]."""
    faiss = _faiss()
    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(np.ascontiguousarray(keys, dtype=np.float32))
    sims, local = search(flat, np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, np.where(local >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(local, 0)], -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k over queries (ids -1 never count)."""
    hits = [len(set(a[:k][a[:k] >= 0].tolist()) & set(b[:k].tolist())) for a, b in zip(found, truth)]
    return float(np.mean(hits) / k) if hits else 1.0
