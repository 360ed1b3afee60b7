"""Sparse (REST-style) datastore for retrieval-based speculative decoding.

The datastore is a suffix array over a token corpus made of many documents.
Given the last tokens of a context, :meth:`SparseIndex.lookup` finds the
longest suffix of the context (``max_suffix`` tokens down to ``min_suffix``)
that occurs in the corpus and returns the continuations that follow its
occurrences, with counts.

Layout
------
* ``tokens``: ONE flat int32 array, shape ``(n_tokens + n_docs,)``: the
  documents concatenated, each followed by the separator ``-1``.  Real token
  ids are ``>= 0``, so the separator never equals a query token: a match, or
  a continuation, never crosses a document boundary.
* ``suffix_array``: shape ``(n_tokens,)``, int32 (int64 for huge corpora):
  the start positions of the suffixes that begin at a real token, sorted by
  their first ``sort_depth`` tokens (``sort_depth >= max_suffix``), ties broken
  by position.  The separator sorts below every real token.

On disk an index is a directory holding ``tokens.npy``, ``suffix_array.npy``
and ``meta.json``; :meth:`SparseIndex.save` writes it atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["SparseIndexError", "Continuations", "SparseIndex"]

FORMAT_VERSION = 1
SEPARATOR = -1
TOKENS_FILE = "tokens.npy"
SUFFIX_ARRAY_FILE = "suffix_array.npy"
META_FILE = "meta.json"
_INDEX_FILES = (TOKENS_FILE, SUFFIX_ARRAY_FILE, META_FILE)
_INT32_MAX = int(np.iinfo(np.int32).max)
# Occurrences counted per lookup, evenly spaced over the matches: on GSM8K (216k tokens) 64-256
# of them give REST as many accepted tokens as 5,000 (the top continuations dominate), in 1/2-1/3
# of the time.
MAX_OCCURRENCES = 256


class SparseIndexError(ValueError):
    """Bad argument, or a missing / corrupt / inconsistent index on disk."""


@dataclass(frozen=True)
class Continuations:
    """Result of :meth:`SparseIndex.lookup`.

    Attributes:
        match_len: length of the matched context suffix, 0 when nothing matched.
        chains: ``(continuation tokens, count)`` pairs, sorted by count
            descending, then tokens ascending.  Continuations are cut at the
            document end, so they may be shorter than ``continuation_len``
            but are never empty.
        n_occurrences: occurrences of the matched suffix in the corpus
            (before the ``max_occurrences`` cap).
    """

    match_len: int
    chains: list[tuple[tuple[int, ...], int]]
    n_occurrences: int


# ---------------------------------------------------------------------------
# building


def _doc_to_array(doc: Sequence[int], i: int) -> np.ndarray:
    """Convert document ``i`` to a 1-D int64 array, validating its ids."""
    try:
        arr = np.asarray(doc)
    except (TypeError, ValueError, OverflowError) as e:
        raise SparseIndexError(f"document {i}: cannot convert to an integer array ({e})") from None
    if arr.ndim != 1:
        raise SparseIndexError(f"document {i}: expected a 1-D token sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise SparseIndexError(f"document {i}: token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise SparseIndexError(f"document {i}: negative token id {int(arr.min())}")
    if int(arr.max()) > _INT32_MAX:
        raise SparseIndexError(f"document {i}: token id {int(arr.max())} exceeds int32 range")
    return arr.astype(np.int64, copy=False)


def _concat_docs(docs: Iterable[Sequence[int]]) -> tuple[np.ndarray, int]:
    """Concatenate documents, each followed by the separator.

    Returns:
        tokens: int32, shape ``(n_tokens + n_docs,)``.
        n_docs: number of documents (empty documents included).
    """
    pieces: list[np.ndarray] = []
    sep = np.array([SEPARATOR], dtype=np.int64)
    n_docs = 0
    for i, doc in enumerate(docs):
        pieces.append(_doc_to_array(doc, i))
        pieces.append(sep)
        n_docs += 1
    if not pieces:
        return np.empty(0, dtype=np.int32), 0
    return np.concatenate(pieces).astype(np.int32), n_docs


def _ranks_from_groups(order: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """Dense ranks (1 = smallest) from a sorting permutation and group starts.

    Shapes: order (N,) sorting permutation; new_group (N,) bool, True where
    the sorted key differs from the previous one -> ranks (N,) int64 in [1, N].
    """
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.cumsum(new_group, dtype=np.int64)
    return ranks


def _dense_rank(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Dense ranks of ``keys`` (N,) given its sorting permutation ``order`` (N,)."""
    sorted_keys = keys[order]
    new_group = np.empty(len(keys), dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_group[1:])
    return _ranks_from_groups(order, new_group)


def _sort_pairs(first: np.ndarray, second: np.ndarray, n_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of positions by ``(first, second)`` rank pairs.

    Shapes: first, second (N,) int64 in [0, n_ranks] -> (order (N,), ranks (N,)).
    """
    base = n_ranks + 1
    if base <= np.iinfo(np.int64).max // base:
        key = first * base + second  # packed pair, fits in int64
        order = np.argsort(key, kind="stable")
        return order, _dense_rank(key, order)
    order = np.lexsort((second, first))  # huge corpora: unpacked, also stable
    f, s = first[order], second[order]
    new_group = np.empty(len(order), dtype=bool)
    new_group[0] = True
    new_group[1:] = (f[1:] != f[:-1]) | (s[1:] != s[:-1])
    return order, _ranks_from_groups(order, new_group)


def _suffix_array(tokens: np.ndarray, max_suffix: int) -> tuple[np.ndarray, int]:
    """Sort all suffixes of ``tokens`` by prefix doubling (vectorised).

    After the round with step ``h``, ``rank[i]`` is the dense rank of
    ``tokens[i:i+h]`` (positions past the end rank 0, below the separator).
    Doubling stops once ``h >= max_suffix`` or all ranks are distinct.
    Stable sorts keep equal prefixes in position order (deterministic).

    Args:
        tokens: int32, shape (N,), with N > 0.
    Returns:
        sa: int64, shape (N,), start positions of ALL suffixes (separators
            included), sorted.
        sort_depth: number of leading tokens ``sa`` is sorted by (N when the
            order is the full lexicographic order).
    """
    n = len(tokens)
    order = np.argsort(tokens, kind="stable")
    rank = _dense_rank(tokens, order)
    h = 1
    while True:
        n_ranks = int(rank[order[-1]])
        if n_ranks == n:  # all prefixes distinct: order is the full suffix order
            return order, n
        if h >= max_suffix:
            return order, h
        second = np.zeros(n, dtype=np.int64)  # rank of tokens[i+h : i+2h]
        second[: n - h] = rank[h:]
        order, rank = _sort_pairs(rank, second, n_ranks)
        h *= 2


# ---------------------------------------------------------------------------
# searching


def _prefix(tokens: np.ndarray, pos: int, length: int) -> tuple[int, ...]:
    """First ``length`` tokens of the suffix at ``pos`` (shorter at the end)."""
    return tuple(tokens[pos : pos + length].tolist())


def _lower_bound(tokens: np.ndarray, sa: np.ndarray, query: tuple[int, ...], lo: int, hi: int) -> int:
    """First index in ``sa[lo:hi]`` whose suffix prefix is ``>= query``."""
    n = len(query)
    while lo < hi:
        mid = (lo + hi) // 2
        if _prefix(tokens, int(sa[mid]), n) < query:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _upper_bound(tokens: np.ndarray, sa: np.ndarray, query: tuple[int, ...], lo: int, hi: int) -> int:
    """First index in ``sa[lo:hi]`` whose suffix prefix is ``> query``."""
    n = len(query)
    while lo < hi:
        mid = (lo + hi) // 2
        if _prefix(tokens, int(sa[mid]), n) <= query:
            lo = mid + 1
        else:
            hi = mid
    return lo


SMALL_COUNT = 64     # occurrences up to this many are counted in plain Python (numpy's calls cost more)


def _count_few(tokens: np.ndarray, starts: np.ndarray, continuation_len: int) -> list[tuple[tuple[int, ...], int]]:
    """``_count_continuations`` for a few occurrences: the same chains in the same order."""
    counts: dict[tuple[int, ...], int] = {}
    for s in starts.tolist():
        row = tokens[s : s + continuation_len].tolist()
        if SEPARATOR in row:
            row = row[: row.index(SEPARATOR)]
        if row:
            key = tuple(row)
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _count_continuations(
    tokens: np.ndarray, starts: np.ndarray, continuation_len: int
) -> list[tuple[tuple[int, ...], int]]:
    """Count the continuations starting at ``starts``, cut at the separator.

    Shapes: starts (m,) -> window (m, continuation_len).  Empty
    continuations (start on a separator) are skipped.  Result is sorted by
    count desc, tokens asc.
    """
    if len(starts) == 0:
        return []
    if len(starts) <= SMALL_COUNT:
        return _count_few(tokens, starts, continuation_len)
    idx = starts.astype(np.int64)[:, None] + np.arange(continuation_len, dtype=np.int64)
    np.minimum(idx, len(tokens) - 1, out=idx)  # tokens ends with a separator
    window = np.asarray(tokens[idx], dtype=np.int64)  # (m, C)
    valid = np.logical_and.accumulate(window >= 0, axis=1)  # prefix before separator
    window = np.where(valid, window, SEPARATOR)[valid[:, 0]]
    if len(window) == 0:
        return []
    # Group identical rows: lexicographic row sort (-1 padding sorts below
    # every token, so row order == tuple order), then run-length count.
    window = window[np.lexsort(window.T[::-1])]
    first = np.ones(len(window), dtype=bool)
    first[1:] = np.any(window[1:] != window[:-1], axis=1)
    group_starts = np.flatnonzero(first)
    counts = np.diff(np.append(group_starts, len(window)))
    rows = window[group_starts]
    lengths = (rows >= 0).sum(axis=1).tolist()
    order = np.argsort(-counts, kind="stable")  # count desc; ties keep tokens asc
    rows_list, counts_list = rows.tolist(), counts.tolist()
    return [(tuple(rows_list[i][: lengths[i]]), counts_list[i]) for i in order.tolist()]


def _check_positive(name: str, value: int, minimum: int) -> int:
    """Validate an integer argument ``>= minimum``; returns it as int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SparseIndexError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SparseIndexError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------
# persistence helpers


def _write_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as .npy and fsync it."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory entry (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_meta(directory: Path) -> dict:
    """Load and validate ``meta.json``."""
    path = directory / META_FILE
    if not path.is_file():
        raise SparseIndexError(f"{path}: missing index metadata file")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparseIndexError(f"{path}: unreadable or corrupt JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SparseIndexError(f"{path}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SparseIndexError(
            f"{path}: unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})"
        )
    int_keys = ("n_tokens", "n_docs", "max_suffix", "sort_depth")
    for key in int_keys:
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SparseIndexError(f"{path}: field {key!r} missing or not a non-negative integer")
    for key in ("tokens_dtype", "suffix_array_dtype"):
        if meta.get(key) not in ("int32", "int64"):
            raise SparseIndexError(f"{path}: field {key!r} missing or invalid ({meta.get(key)!r})")
    if meta["tokens_dtype"] != "int32":
        raise SparseIndexError(f"{path}: tokens_dtype must be 'int32', got {meta['tokens_dtype']!r}")
    return meta


def _load_array(path: Path, mmap: bool, dtype: str, length: int) -> np.ndarray:
    """Load a 1-D .npy array and check its dtype and length."""
    if not path.is_file():
        raise SparseIndexError(f"{path}: missing index file")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/... on corruption
        raise SparseIndexError(f"{path}: corrupt or truncated array file ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise SparseIndexError(f"{path}: expected a single .npy array")
    if arr.dtype != np.dtype(dtype):
        raise SparseIndexError(f"{path}: dtype {arr.dtype} does not match meta.json ({dtype})")
    if arr.ndim != 1 or arr.shape[0] != length:
        raise SparseIndexError(f"{path}: shape {arr.shape} does not match meta.json (expected ({length},))")
    return np.asarray(arr)  # plain ndarray view (faster slicing than np.memmap)


# ---------------------------------------------------------------------------
# the index

PAIR_KEYS_MAX_TOKENS = 1 << 25      # corpora up to this many tokens get pair keys (at most 256 MiB)


class SparseIndex:
    """Suffix-array datastore over a multi-document token corpus.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`,
    query with :meth:`lookup`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        suffix_array: np.ndarray,
        *,
        n_docs: int,
        max_suffix: int,
        sort_depth: int,
    ) -> None:
        """Wrap prepared arrays (use :meth:`build` or :meth:`load`).

        Args:
            tokens: int32, shape (n_tokens + n_docs,), separator-terminated docs.
            suffix_array: int32/int64, shape (n_tokens,), sorted real-token suffixes.
        """
        self._tokens = tokens
        self._sa = suffix_array
        self._n_docs = int(n_docs)
        self._max_suffix = int(max_suffix)
        self._sort_depth = int(sort_depth)
        self._pairs: tuple[np.ndarray, int] | None | bool = False     # _pair_keys(), built on first lookup

    # -- properties ---------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Number of corpus tokens (separators excluded)."""
        return int(self._sa.shape[0])

    @property
    def n_docs(self) -> int:
        """Number of documents (empty documents included)."""
        return self._n_docs

    @property
    def max_suffix(self) -> int:
        """``max_suffix`` the index was built with."""
        return self._max_suffix

    @property
    def sort_depth(self) -> int:
        """Leading tokens the suffix array is sorted by (>= max_suffix)."""
        return self._sort_depth

    @property
    def tokens(self) -> np.ndarray:
        """Flat corpus, int32, shape (n_tokens + n_docs,); -1 ends each doc."""
        return self._tokens

    @property
    def suffix_array(self) -> np.ndarray:
        """Sorted suffix start positions, shape (n_tokens,)."""
        return self._sa

    def __repr__(self) -> str:
        return (
            f"SparseIndex(n_tokens={self.n_tokens}, n_docs={self.n_docs}, "
            f"max_suffix={self.max_suffix}, sort_depth={self.sort_depth})"
        )

    # -- building -----------------------------------------------------------

    @classmethod
    def build(cls, docs: Iterable[Sequence[int]], *, max_suffix: int = 16) -> "SparseIndex":
        """Build an index from documents (sequences of token ids >= 0).

        Zero documents, or only empty ones, give a valid empty index whose
        lookups return no match.

        Raises:
            SparseIndexError: negative / non-integer / > int32 token ids,
                or ``max_suffix < 1``.
        """
        max_suffix = _check_positive("max_suffix", max_suffix, 1)
        tokens, n_docs = _concat_docs(docs)
        if len(tokens) == 0:
            sa = np.empty(0, dtype=np.int32)
            return cls(tokens, sa, n_docs=n_docs, max_suffix=max_suffix, sort_depth=max_suffix)
        order, sort_depth = _suffix_array(tokens, max_suffix)
        sa = order[tokens[order] >= 0]  # drop suffixes starting at a separator
        sa_dtype = np.int32 if len(tokens) <= _INT32_MAX else np.int64
        return cls(tokens, sa.astype(sa_dtype), n_docs=n_docs, max_suffix=max_suffix, sort_depth=sort_depth)

    # -- persistence --------------------------------------------------------

    def _meta(self) -> dict:
        """The ``meta.json`` content."""
        return {
            "format_version": FORMAT_VERSION,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "max_suffix": self.max_suffix,
            "sort_depth": self.sort_depth,
            "separator": SEPARATOR,
            "tokens_dtype": str(self._tokens.dtype),
            "suffix_array_dtype": str(self._sa.dtype),
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index into ``directory`` atomically.

        Files are written into a temporary sibling directory which is then
        renamed into place.  An existing index directory is replaced (moved
        aside, then deleted); a reader sees either the old index, the new one
        or (for an instant while replacing) no directory, never a partial
        one.  A non-empty existing directory that does not look like an index
        is refused rather than deleted.
        """
        target = Path(directory)
        parent = target.parent
        if target.exists():
            if not target.is_dir():
                raise SparseIndexError(f"{target}: exists and is not a directory")
            foreign = [p.name for p in target.iterdir() if p.name not in _INDEX_FILES]
            if foreign:
                raise SparseIndexError(
                    f"{target}: refusing to replace a directory with non-index files {sorted(foreign)[:5]}"
                )
        parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        tmp = parent / f".{target.name}.tmp-{tag}"
        old = parent / f".{target.name}.old-{tag}"
        tmp.mkdir()
        try:
            _write_npy(tmp / TOKENS_FILE, self._tokens)
            _write_npy(tmp / SUFFIX_ARRAY_FILE, self._sa)
            with open(tmp / META_FILE, "w") as f:
                json.dump(self._meta(), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not target.exists():
                os.replace(old, target)  # put the previous index back
            raise
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> "SparseIndex":
        """Load an index saved by :meth:`save`.

        Args:
            mmap: memory-map the arrays read-only (``np.load(mmap_mode="r")``).
        Raises:
            SparseIndexError: missing directory/files, corrupt or truncated
                files, or arrays inconsistent with ``meta.json``.
        """
        root = Path(directory)
        if not root.is_dir():
            raise SparseIndexError(f"{root}: index directory does not exist")
        meta = _read_meta(root)
        n_tokens, n_docs = meta["n_tokens"], meta["n_docs"]
        tokens = _load_array(root / TOKENS_FILE, mmap, meta["tokens_dtype"], n_tokens + n_docs)
        sa = _load_array(root / SUFFIX_ARRAY_FILE, mmap, meta["suffix_array_dtype"], n_tokens)
        if n_docs > 0 and int(tokens[-1]) != SEPARATOR:
            raise SparseIndexError(f"{root / TOKENS_FILE}: corpus does not end with the separator {SEPARATOR}")
        if meta["sort_depth"] < 1:
            raise SparseIndexError(f"{root / META_FILE}: sort_depth must be >= 1")
        return cls(tokens, sa, n_docs=n_docs, max_suffix=meta["max_suffix"], sort_depth=meta["sort_depth"])

    # -- querying -----------------------------------------------------------

    def _pair_keys(self) -> tuple[np.ndarray, int] | None:
        """Each suffix's first two tokens as one sorted int64 key, (first + 1) * m + (second + 1)
        in suffix-array order (m: the largest token + 2; a separator counts as -1), and m: one
        vectorised search then finds the suffixes of a query's first two tokens, so the Python
        binary search only runs inside that range. None when the suffix array is not sorted by
        two tokens or the keys would take more memory than the corpus is worth it (8 bytes a token)."""
        if self._pairs is False:
            self._pairs = None
            n = len(self._sa)
            if n and self._sort_depth >= 2 and n <= PAIR_KEYS_MAX_TOKENS:
                sa = np.asarray(self._sa, dtype=np.int64)
                m = int(self._tokens.max()) + 2
                keys = (self._tokens[sa].astype(np.int64) + 1) * m + (self._tokens[sa + 1].astype(np.int64) + 1)
                self._pairs = (keys, m)
        return self._pairs

    def _bounds(self, query: tuple[int, ...]) -> tuple[int, int]:
        """A suffix-array range ``[lo, hi)`` that holds every suffix starting with ``query``
        (of its first two tokens; the whole array without pair keys)."""
        pairs = self._pair_keys()
        if pairs is None or not query:
            return 0, len(self._sa)
        keys, m = pairs
        if max(query[:2]) >= m - 1:                 # a token the corpus does not have
            return len(self._sa), len(self._sa)
        if len(query) == 1:
            lo_key, hi_key = (query[0] + 1) * m, (query[0] + 2) * m
            return int(np.searchsorted(keys, lo_key, "left")), int(np.searchsorted(keys, hi_key, "left"))
        key = (query[0] + 1) * m + query[1] + 1
        return int(np.searchsorted(keys, key, "left")), int(np.searchsorted(keys, key, "right"))

    def _range(self, query: tuple[int, ...]) -> tuple[int, int]:
        """Suffix-array range ``[lo, hi)`` of suffixes starting with ``query``."""
        b_lo, b_hi = self._bounds(query)
        lo = _lower_bound(self._tokens, self._sa, query, b_lo, b_hi)
        hi = _upper_bound(self._tokens, self._sa, query, lo, b_hi)
        return lo, hi

    def _occurs(self, query: tuple[int, ...]) -> bool:
        """Whether ``query`` occurs in the corpus (one binary search)."""
        b_lo, b_hi = self._bounds(query)
        lo = _lower_bound(self._tokens, self._sa, query, b_lo, b_hi)
        return lo < b_hi and _prefix(self._tokens, int(self._sa[lo]), len(query)) == query

    def _longest_match(self, tail: tuple[int, ...], min_suffix: int) -> int:
        """Largest L in [min_suffix, len(tail)] with ``tail[-L:]`` in the corpus, else 0.

        Occurrence is monotone in L (an occurrence of the (L+1)-suffix at p
        contains one of the L-suffix at p+1, inside the same document), so
        L is found by binary search: O(log(max_suffix)) suffix-array searches.
        """
        if len(tail) < min_suffix or not self._occurs(tail[-min_suffix:]):
            return 0
        lo, hi = min_suffix, len(tail)  # invariant: lo occurs; answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._occurs(tail[-mid:]):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def lookup(
        self,
        context: Sequence[int],
        *,
        max_suffix: int = 16,
        min_suffix: int = 2,
        continuation_len: int = 10,
        max_occurrences: int = MAX_OCCURRENCES,
    ) -> Continuations:
        """Continuations of the longest context suffix found in the corpus.

        Tries suffix lengths from ``min(max_suffix, len(context))`` down to
        ``min_suffix`` (``max_suffix`` is capped at :attr:`sort_depth`); a
        suffix containing a negative id never matches.  Takes at most
        ``max_occurrences`` occurrences, evenly spaced in suffix-array order
        (the first ones would all share their smallest next tokens), and counts
        their next ``continuation_len`` tokens (cut at the document end;
        occurrences at a document end contribute nothing, so ``chains`` can
        be empty even when ``match_len > 0``).

        Returns:
            ``Continuations(0, [], 0)`` when no suffix of length >=
            ``min_suffix`` occurs.
        Raises:
            SparseIndexError: invalid arguments.
        """
        min_suffix = _check_positive("min_suffix", min_suffix, 1)
        max_suffix = _check_positive("max_suffix", max_suffix, 1)
        if max_suffix < min_suffix:
            raise SparseIndexError(f"max_suffix ({max_suffix}) must be >= min_suffix ({min_suffix})")
        continuation_len = _check_positive("continuation_len", continuation_len, 1)
        max_occurrences = _check_positive("max_occurrences", max_occurrences, 1)

        width = min(max_suffix, self._sort_depth)
        try:
            tail = tuple(int(t) for t in list(context[-width:]))
        except (TypeError, ValueError) as e:
            raise SparseIndexError(f"context must be a sequence of integer token ids ({e})") from None
        negative = [i for i, t in enumerate(tail) if t < 0]
        if negative:
            tail = tail[negative[-1] + 1 :]

        match_len = self._longest_match(tail, min_suffix) if len(self._sa) else 0
        if match_len == 0:
            return Continuations(0, [], 0)
        lo, hi = self._range(tail[-match_len:])
        if hi - lo <= max_occurrences:
            picked = np.asarray(self._sa[lo:hi], dtype=np.int64)
        else:       # evenly spaced over the range: the first ones would all share their smallest next tokens
            spaced = lo + np.arange(max_occurrences) * (hi - lo) // max_occurrences
            picked = np.asarray(self._sa[spaced], dtype=np.int64)
        starts = picked + match_len
        chains = _count_continuations(self._tokens, starts, continuation_len)
        return Continuations(match_len, chains, hi - lo)
