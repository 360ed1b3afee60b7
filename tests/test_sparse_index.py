"""Tests for index.sparse (REST-style suffix-array datastore)."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from index.sparse import Continuations, SparseIndex, SparseIndexError

# ---------------------------------------------------------------------------
# helpers


def ref_lookup(docs, context, *, max_suffix=16, min_suffix=2, continuation_len=10):
    """Brute-force reference: scan every document position, longest length first."""
    ctx = [int(t) for t in context]
    for L in range(min(max_suffix, len(ctx)), min_suffix - 1, -1):
        q = ctx[-L:]
        conts = []
        for d in docs:
            for p in range(len(d) - L + 1):
                if d[p : p + L] == q:
                    conts.append(tuple(d[p + L : p + L + continuation_len]))
        if conts:
            counts = Counter(c for c in conts if c)
            chains = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            return Continuations(L, chains, len(conts))
    return Continuations(0, [], 0)


def random_docs(rng, n_docs, vocab, max_len):
    """Documents of varied lengths (including 0 and 1) as lists of ints."""
    lengths = rng.integers(0, max_len + 1, size=n_docs)
    lengths[: min(3, n_docs)] = 1  # always some length-1 docs
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def random_contexts(rng, docs, n, vocab):
    """Mix of corpus slices, cross-document splices, random and negative-id contexts."""
    nonempty = [d for d in docs if d]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # slice of a document (guaranteed match if long enough)
            d = nonempty[rng.integers(len(nonempty))]
            a = int(rng.integers(0, len(d)))
            b = int(rng.integers(a, len(d) + 1))
            out.append(d[a:b])
        elif kind == 1:  # tail of one doc + head of another: crosses a boundary
            d1 = nonempty[rng.integers(len(nonempty))]
            d2 = nonempty[rng.integers(len(nonempty))]
            out.append(d1[-int(rng.integers(1, 6)) :] + d2[: int(rng.integers(1, 6))])
        elif kind == 2:
            out.append(rng.integers(0, vocab, size=int(rng.integers(0, 25))).tolist())
        else:  # random with a negative id somewhere
            c = rng.integers(0, vocab, size=int(rng.integers(1, 25))).tolist()
            c[int(rng.integers(len(c)))] = -1
            out.append(c)
    return out


def python_suffix_array(index: SparseIndex) -> list[int]:
    """Reference suffix order: (first sort_depth tokens, position), real tokens only."""
    flat = index.tokens.tolist()
    depth = index.sort_depth
    pos = [p for p, t in enumerate(flat) if t >= 0]
    return sorted(pos, key=lambda p: (flat[p : p + depth], p))


def assert_same(a: Continuations, b: Continuations):
    assert a.match_len == b.match_len
    assert a.n_occurrences == b.n_occurrences
    assert a.chains == b.chains


# ---------------------------------------------------------------------------
# correctness against brute force


@pytest.mark.parametrize("seed", range(6))
def test_lookup_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    vocab = [2, 3, 4, 5, 8, 3][seed]
    docs = random_docs(rng, n_docs=int(rng.integers(5, 40)), vocab=vocab, max_len=60)
    index = SparseIndex.build(docs)
    assert index.n_docs == len(docs)
    assert index.n_tokens == sum(map(len, docs))
    for ctx in random_contexts(rng, docs, 80, vocab):
        for kwargs in ({}, {"min_suffix": 1, "max_suffix": 5, "continuation_len": 3}):
            got = index.lookup(ctx, max_occurrences=10**9, **kwargs)
            assert_same(got, ref_lookup(docs, ctx, **kwargs))


@pytest.mark.parametrize("seed", range(3))
def test_pair_keys_narrow_the_search_without_changing_a_lookup(seed, monkeypatch):
    """Lookups narrowed by the suffixes' first two tokens (the default) equal lookups over the
    whole suffix array, for tokens the corpus lacks too, and at sort depth 1 (no pair keys)."""
    import index.sparse as sparse

    rng = np.random.default_rng(200 + seed)
    docs = random_docs(rng, n_docs=30, vocab=6, max_len=50)
    contexts = random_contexts(rng, docs, 60, 9)          # tokens 6..8 never occur
    for max_suffix in (16, 1):
        narrowed = SparseIndex.build(docs, max_suffix=max_suffix)
        got = [narrowed.lookup(c, min_suffix=1, max_suffix=max_suffix, max_occurrences=10**9) for c in contexts]
        assert (narrowed._pair_keys() is not None) == (max_suffix >= 2)
        monkeypatch.setattr(sparse, "PAIR_KEYS_MAX_TOKENS", 0)
        whole = SparseIndex.build(docs, max_suffix=max_suffix)
        assert whole._pair_keys() is None
        for c, a in zip(contexts, got):
            assert_same(a, whole.lookup(c, min_suffix=1, max_suffix=max_suffix, max_occurrences=10**9))
            assert_same(a, ref_lookup(docs, c, min_suffix=1, max_suffix=max_suffix))
        monkeypatch.undo()


@pytest.mark.parametrize("seed", range(3))
def test_suffix_array_order(seed):
    rng = np.random.default_rng(100 + seed)
    docs = random_docs(rng, n_docs=20, vocab=2 + seed, max_len=40)
    for max_suffix in (1, 3, 16):
        index = SparseIndex.build(docs, max_suffix=max_suffix)
        assert index.sort_depth >= max_suffix
        assert index.suffix_array.tolist() == python_suffix_array(index)


def test_match_len_is_longest_and_counts_exact():
    docs = [[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [2, 3, 4, 5], [3, 4, 7]]
    index = SparseIndex.build(docs)
    r = index.lookup([8, 1, 2, 3, 4])
    assert r == Continuations(4, [((5,), 1)], 1)
    r = index.lookup([0, 0, 2, 3, 4])
    assert r.match_len == 3 and r.n_occurrences == 3
    assert r.chains == [((5,), 2), ((6,), 1)]
    r = index.lookup([0, 3, 4], continuation_len=1)
    assert r.match_len == 2 and r.n_occurrences == 4
    assert r.chains == [((5,), 2), ((6,), 1), ((7,), 1)]


def test_separators_never_crossed():
    docs = [[1, 2, 3], [4, 5], [3, 4, 5, 6]]
    index = SparseIndex.build(docs)
    # "3 4" only occurs inside doc 2, never across the doc0/doc1 boundary.
    r = index.lookup([3, 4])
    assert r == Continuations(2, [((5, 6), 1)], 1)
    # "2 3" ends doc 0: a match, but no continuation.
    assert index.lookup([2, 3]) == Continuations(2, [], 1)
    # continuation cut at the end of doc 0
    assert index.lookup([1, 2]) == Continuations(2, [((3,), 1)], 1)
    # "3 4 5" crossing doc0->doc1 does not exist except in doc 2
    r = index.lookup([2, 3, 4, 5])
    assert r.match_len == 3 and r.chains == [((6,), 1)]
    # no continuation ever contains the separator
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 50, 3, 20)
    index = SparseIndex.build(docs)
    for ctx in random_contexts(rng, docs, 50, 3):
        for toks, _ in index.lookup(ctx, min_suffix=1, continuation_len=50).chains:
            assert toks and min(toks) >= 0


def test_negative_ids_in_context_never_match():
    index = SparseIndex.build([[1, 2, 3], [4, 5, 6]])
    # -1 would equal the stored separator; it must not let "3 <sep> 4" match.
    assert index.lookup([3, -1, 4]) == Continuations(0, [], 0)
    assert index.lookup([3, -1, 4, 5]).match_len == 2


def test_wide_token_ids():
    big = [70000, 2**31 - 2, 2**31 - 1, 65535, 65536]
    docs = [[70000, 2**31 - 2, 5, 70000, 2**31 - 2, 6], big, [2**31 - 2, 70000]]
    index = SparseIndex.build(docs)
    assert index.tokens.dtype == np.int32
    r = index.lookup([1, 70000, 2**31 - 2])
    assert r == Continuations(2, [((5, 70000, 2**31 - 2, 6), 1), ((6,), 1), ((2**31 - 1, 65535, 65536), 1)], 3)
    assert index.lookup([2**31 - 2, 70000]) == Continuations(2, [], 1)
    # ids that would wrap around in 16 bits must not alias
    assert index.lookup([70000 - 65536, 2**31 - 2]) == Continuations(0, [], 0)
    with pytest.raises(SparseIndexError, match="int32"):
        SparseIndex.build([[2**31]])


def test_max_occurrences_cap_spreads_over_the_suffix_array_range():
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 30, 2, 50)
    index = SparseIndex.build(docs)
    flat = index.tokens.tolist()
    sa = python_suffix_array(index)
    ctx = [0, 1, 0]
    full = index.lookup(ctx, max_occurrences=10**9)
    L = full.match_len
    assert L == 3 and full.n_occurrences > 10
    for cap in (1, 5, 10):
        r = index.lookup(ctx, max_occurrences=cap)
        assert r.match_len == L and r.n_occurrences == full.n_occurrences
        occ = [p for p in sa if flat[p : p + L] == ctx[-L:]]
        occ = [occ[i * len(occ) // cap] for i in range(cap)]          # evenly spaced, not the first
        conts = []
        for p in occ:
            c = flat[p + L : p + L + 10]
            c = tuple(c[: c.index(-1)] if -1 in c else c)
            if c:
                conts.append(c)
        expected = sorted(Counter(conts).items(), key=lambda kv: (-kv[1], kv[0]))
        assert r.chains == expected
        assert sum(n for _, n in r.chains) <= cap


def test_max_suffix_clamped_to_sort_depth():
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, 2, 300).tolist() for _ in range(5)]  # very repetitive
    index = SparseIndex.build(docs, max_suffix=3)
    assert index.max_suffix == 3 and index.sort_depth == 4
    for ctx in random_contexts(rng, docs, 40, 2):
        got = index.lookup(ctx, max_occurrences=10**9)
        assert_same(got, ref_lookup(docs, ctx, max_suffix=4))


def test_short_context_and_no_match():
    index = SparseIndex.build([[1, 2, 3]])
    assert index.lookup([]) == Continuations(0, [], 0)
    assert index.lookup([1]) == Continuations(0, [], 0)
    assert index.lookup([1], min_suffix=1) == Continuations(1, [((2, 3), 1)], 1)
    assert index.lookup([7, 8, 9]) == Continuations(0, [], 0)
    assert index.lookup(np.array([1, 2], dtype=np.int64)) == Continuations(2, [((3,), 1)], 1)


# ---------------------------------------------------------------------------
# empty corpora, arguments, determinism


@pytest.mark.parametrize("docs", [[], [[]], [[], [], []]])
def test_empty_corpus_gives_empty_index(docs, tmp_path):
    index = SparseIndex.build(docs)
    assert index.n_tokens == 0 and index.n_docs == len(docs)
    assert index.lookup([1, 2, 3]) == Continuations(0, [], 0)
    index.save(tmp_path / "idx")
    loaded = SparseIndex.load(tmp_path / "idx")
    assert loaded.n_tokens == 0 and loaded.n_docs == len(docs)
    assert loaded.lookup([1, 2, 3], min_suffix=1) == Continuations(0, [], 0)


def test_build_rejects_bad_input():
    with pytest.raises(SparseIndexError, match="negative"):
        SparseIndex.build([[1, 2], [3, -4]])
    with pytest.raises(SparseIndexError, match="integer"):
        SparseIndex.build([[1.5, 2.0]])
    with pytest.raises(SparseIndexError, match="1-D"):
        SparseIndex.build([[[1, 2]]])
    with pytest.raises(SparseIndexError, match="max_suffix"):
        SparseIndex.build([[1, 2]], max_suffix=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_suffix": 0}, "min_suffix"),
        ({"max_suffix": 1, "min_suffix": 2}, "max_suffix"),
        ({"max_suffix": 0}, "max_suffix"),
        ({"continuation_len": 0}, "continuation_len"),
        ({"max_occurrences": 0}, "max_occurrences"),
        ({"max_occurrences": 2.5}, "max_occurrences"),
    ],
)
def test_lookup_rejects_bad_args(kwargs, name):
    index = SparseIndex.build([[1, 2, 3]])
    with pytest.raises(SparseIndexError, match=name):
        index.lookup([1, 2], **kwargs)


def test_determinism():
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 40, 3, 50)
    a, b = SparseIndex.build(docs), SparseIndex.build(iter([np.array(d, dtype=np.int64) for d in docs]))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.suffix_array, b.suffix_array)
    for ctx in random_contexts(rng, docs, 30, 3):
        assert_same(a.lookup(ctx, max_occurrences=3), b.lookup(ctx, max_occurrences=3))


# ---------------------------------------------------------------------------
# persistence


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(9)
    docs = random_docs(rng, 30, 4, 40) + [[70000, 2**31 - 2, 1]]
    index = SparseIndex.build(docs)
    path = tmp_path / "idx"
    index.save(path)
    return index, docs, path


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(saved, mmap):
    index, docs, path = saved
    assert sorted(os.listdir(path)) == ["meta.json", "suffix_array.npy", "tokens.npy"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["n_tokens"] == index.n_tokens
    assert meta["tokens_dtype"] == "int32"
    loaded = SparseIndex.load(path, mmap=mmap)
    assert (loaded.n_tokens, loaded.n_docs, loaded.sort_depth) == (index.n_tokens, index.n_docs, index.sort_depth)
    np.testing.assert_array_equal(loaded.suffix_array, index.suffix_array)
    rng = np.random.default_rng(1)
    for ctx in random_contexts(rng, docs, 40, 4) + [[70000, 2**31 - 2]]:
        assert_same(loaded.lookup(ctx), index.lookup(ctx))


def test_save_replaces_existing_index_atomically(saved):
    _, _, path = saved
    other = SparseIndex.build([[5, 6, 7]])
    other.save(path)
    loaded = SparseIndex.load(path)
    assert loaded.n_tokens == 3 and loaded.lookup([5, 6]) == Continuations(2, [((7,), 1)], 1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["idx"]  # no temp dirs left


def test_save_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SparseIndexError, match="non-index"):
        SparseIndex.build([[1, 2]]).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", ["tokens.npy", "suffix_array.npy"])
def test_truncated_array_file(saved, name, mmap):
    _, _, path = saved
    f = path / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparseIndexError, match=name):
        SparseIndex.load(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", ["tokens.npy", "suffix_array.npy"])
def test_corrupt_array_file(saved, name, mmap):
    _, _, path = saved
    (path / name).write_bytes(b"this is not a numpy file at all" * 10)
    with pytest.raises(SparseIndexError, match=name):
        SparseIndex.load(path, mmap=mmap)


@pytest.mark.parametrize("name", ["tokens.npy", "suffix_array.npy", "meta.json"])
def test_missing_file(saved, name):
    _, _, path = saved
    (path / name).unlink()
    with pytest.raises(SparseIndexError, match=name):
        SparseIndex.load(path)


def test_bad_meta_and_inconsistent_arrays(saved):
    _, _, path = saved
    meta_path = path / "meta.json"
    good = json.loads(meta_path.read_text())

    meta_path.write_text("{not json")
    with pytest.raises(SparseIndexError, match="meta.json"):
        SparseIndex.load(path)

    meta_path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(SparseIndexError, match="format_version"):
        SparseIndex.load(path)

    meta_path.write_text(json.dumps({**good, "n_tokens": good["n_tokens"] + 1}))
    with pytest.raises(SparseIndexError, match="shape"):
        SparseIndex.load(path)

    meta_path.write_text(json.dumps(good))
    np.save(path / "tokens.npy", np.load(path / "tokens.npy").astype(np.int64))
    with pytest.raises(SparseIndexError, match="dtype"):
        SparseIndex.load(path)

    with pytest.raises(SparseIndexError, match="does not exist"):
        SparseIndex.load(path.parent / "nope")


# ---------------------------------------------------------------------------
# scale


def test_build_one_million_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(150, 251, size=5000)
    docs = [rng.integers(0, 50_000, size=n, dtype=np.int64) for n in lengths]
    index = SparseIndex.build(docs)
    assert index.n_tokens == int(lengths.sum()) and index.n_docs == 5000
    assert index.suffix_array.dtype == np.int32
    sa = index.suffix_array[:100_000].astype(np.int64)
    assert np.all(index.tokens[sa[:-1]] <= index.tokens[sa[1:]])  # sorted by first token
    d = docs[123].tolist()
    r = index.lookup(d[10:40])
    assert r.match_len == 16 and r.n_occurrences >= 1
    assert r.chains[0][0] == tuple(d[40:50]) or r.n_occurrences > 1


def test_unpacked_pair_sort_matches_packed():
    """The lexsort fallback (for corpora too big to pack rank pairs) agrees."""
    from index.sparse import _sort_pairs

    rng = np.random.default_rng(2)
    first = rng.integers(1, 6, 500).astype(np.int64)
    second = rng.integers(0, 6, 500).astype(np.int64)
    packed = _sort_pairs(first, second, n_ranks=5)
    fallback = _sort_pairs(first, second, n_ranks=2**40)  # forces the lexsort path
    np.testing.assert_array_equal(packed[0], fallback[0])
    np.testing.assert_array_equal(packed[1], fallback[1])


def test_few_occurrences_counted_in_python_as_numpy_counts_them(monkeypatch):
    from index import sparse
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 40, 3, 60)
    index = SparseIndex.build(docs)
    contexts = random_contexts(rng, docs, 60, 1)
    for kwargs in ({"min_suffix": 1}, {"min_suffix": 1, "continuation_len": 1}, {"max_suffix": 2, "continuation_len": 30}):
        monkeypatch.setattr(sparse, "SMALL_COUNT", 0)
        by_numpy = [index.lookup(c, max_occurrences=10**9, **kwargs) for c in contexts]
        monkeypatch.setattr(sparse, "SMALL_COUNT", 10**9)
        by_python = [index.lookup(c, max_occurrences=10**9, **kwargs) for c in contexts]
        assert by_python == by_numpy
        assert any(len(r.chains) > 1 for r in by_numpy) and any(r.n_occurrences > 1 for r in by_numpy)
