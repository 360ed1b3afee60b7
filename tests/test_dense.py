"""Dense datastore: format, builder, compatibility checks, and strict dense drafting."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from decoding.config import SamplingParams
from decoding.drafters import DenseDrafter, HybridDrafter, NoDrafter, PromptLookupDrafter, SparseDrafter
from decoding.engine import encode_prompt, generate
from index.corpus import gsm8k
from decoding.dense_extract import hidden_states
from decoding.fingerprint import model_fingerprint
from index.dense_build import next_tokens
from index.dense_format import DatastoreError, KeyTransform, read_manifest
from index.dense_store import DenseStore


def test_transform_is_unit_norm_and_deterministic():
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(500, 48)) * rng.uniform(0.1, 5, size=48) + rng.normal(size=48)
    t = KeyTransform.fit(sample, dim=16)
    k = t(sample[:10])
    assert k.shape == (10, 16) and np.allclose(np.linalg.norm(k, axis=1), 1, atol=1e-5)
    assert np.array_equal(k, KeyTransform.fit(sample, dim=16)(sample[:10]))
    with pytest.raises(ValueError):
        KeyTransform.fit(sample[:5], dim=16)


def test_next_tokens_pads_with_eos():
    v = next_tokens(np.array([5, 6, 7]), 3, eos=2)
    assert v.tolist() == [[6, 7, 2], [7, 2, 2], [2, 2, 2]]


def test_manifest_and_shards(dense_store_dir, dense_docs):
    m = read_manifest(dense_store_dir)
    expected = sum(len(d.tokens) - max(d.store_from - 1, 0) - 1 for d in dense_docs)
    assert m.entries == expected and m.documents == len(dense_docs) and m.key_dim == 32 and m.value_len == 8
    assert len(m.shards) >= 2 and sum(s["rows"] for s in m.shards) == expected
    assert m.corpora == ["gsm8k_train"]


def test_builder_keys_equal_a_recomputation(target, dense_store_dir, dense_docs):
    store = DenseStore.load(dense_store_dir, expect=model_fingerprint(target))
    import pyarrow.parquet as pq

    table = pq.read_table(dense_store_dir / read_manifest(dense_store_dir).shards[0]["path"]).to_pylist()
    rng = np.random.default_rng(1)
    for row in (table[i] for i in rng.choice(len(table), 6, replace=False)):
        doc = dense_docs[row["doc_id"]]
        t = row["position"]
        # The key: the hidden state having read tokens 0..t, recomputed from that prefix alone.
        h = hidden_states(target, doc.tokens[: t + 1])[-1]
        assert np.allclose(store.transform(h), np.array(row["key"]), atol=1e-4)
        want = list(doc.tokens[t + 1: t + 9]) + [store.manifest.eos_token_id] * 8
        assert row["value"] == want[:8] and row["first_token"] == want[0]


def test_window_states_take_the_engines_prefill_and_whole_context_windows(target, monkeypatch):
    """A window's hidden states are the engine's prompt prefill's (the lean forward) when it
    leaves room for a token, like every window shorter than the context; a window of the whole
    context (a model whose context is the window length) goes through the model's forward instead
    of failing the prefill's length check, with the same states up to float rounding."""
    import torch

    from decoding.dense_extract import hidden_states_batch, window_states

    seq = [(7 * i + 3) % 5000 + 10 for i in range(64)]
    with torch.inference_mode():
        _, out = target.prefill(seq, reuse=False)
    (got,) = window_states(target, [seq])
    assert np.array_equal(got, out.hidden.float().numpy())
    monkeypatch.setattr(target, "context_window", 64)
    (whole,) = window_states(target, [seq])
    assert np.array_equal(whole, hidden_states_batch(target, [seq])[0])
    assert np.allclose(whole, got, atol=1e-3)


def test_search_returns_itself(target, dense_store_dir):
    store = DenseStore.load(dense_store_dir)
    sims, ids = store.search(store.keys[:5], 3)
    assert ids[:, 0].tolist() == list(range(5)) and np.allclose(sims[:, 0], 1, atol=1e-4)


def test_refuses_other_model_tokenizer_or_layer(target, dense_store_dir):
    fp = model_fingerprint(target)
    for change in ({"weights_hash": "0" * 16}, {"tokenizer_hash": "f" * 16}, {"layer": 7}):
        other = type(fp)(**{**fp.__dict__, **change})
        with pytest.raises(DatastoreError, match="rebuild the datastore"):
            DenseStore.load(dense_store_dir, expect=other)


def test_corrupt_truncated_or_incomplete(dense_store_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dense_store_dir, bad)
    shard = bad / read_manifest(bad).shards[0]["path"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DatastoreError, match="checksum"):
        DenseStore.load(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(DatastoreError, match="not a datastore"):
        DenseStore.load(bad)
    evil = tmp_path / "evil"
    shutil.copytree(dense_store_dir, evil)
    m = json.loads((evil / "manifest.json").read_text())
    m["shards"][0]["path"] = "../../etc/passwd"
    (evil / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatastoreError, match="outside"):
        DenseStore.load(evil)


def test_strict_dense_and_hybrid_equal_autoregressive(target, dense_store_dir, gsm8k_sparse_index):
    """Strict verification with dense, dense-chains and hybrid drafts reproduces greedy decoding."""
    store = DenseStore.load(dense_store_dir)
    params = SamplingParams(max_new_tokens=20)
    drafters = {
        "dense": DenseDrafter(store),
        "dresd": DenseDrafter(store, mode="chains", dynamic=False),
        "hybrid": HybridDrafter([(PromptLookupDrafter(), 1.0), (SparseDrafter(gsm8k_sparse_index), 1.0),
                                 (DenseDrafter(store), 1.0)]),
    }
    questions = [r["question"] for r in gsm8k("test")[:4]]
    accepted = {k: 0 for k in drafters}
    for q in questions:
        ids = encode_prompt(target, q)
        ref = generate(target, ids, params=params, drafter=NoDrafter()).token_ids
        for name, d in drafters.items():
            r = generate(target, ids, params=params, drafter=d, budget=12)
            assert r.token_ids == ref, (name, q)
            accepted[name] += r.stats.accepted
    assert all(v > 0 for v in accepted.values()), accepted


def test_large_store_uses_ivf_with_good_recall():
    """Above EXACT_MAX keys the store switches to IVF; on clustered keys it finds the true neighbours."""
    import faiss

    from index.dense_store import build_faiss_index
    from index.faiss_ops import EXACT_MAX

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 32))
    keys = centres[rng.integers(0, 200, EXACT_MAX + 10_000)] + 0.3 * rng.normal(size=(EXACT_MAX + 10_000, 32))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    index = build_faiss_index(keys)
    assert isinstance(index, faiss.IndexIVFFlat)
    queries = keys[rng.choice(len(keys), 200, replace=False)] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    exact = faiss.IndexFlatIP(32)
    exact.add(keys)
    _, truth = exact.search(queries, 10)
    _, got = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
    assert recall >= 0.9, recall


def test_anchor_keys_are_the_keys_where_the_drafted_tokens_stood(target, dense_store_dir, dense_docs):
    """A static chain from entry (doc, t) drafts the tokens at t+2, t+3, ...; each one's anchor is
    the key of the entry at that position of the same document (looked up here independently,
    through the shards' doc_id/position columns), NaN past the document's stored positions."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    store = DenseStore.load(dense_store_dir)
    m = read_manifest(dense_store_dir)
    table = pa.concat_tables([pq.read_table(dense_store_dir / s["path"], columns=["doc_id", "position"])
                              for s in m.shards])
    doc_of, pos_of = table.column("doc_id").to_numpy(), table.column("position").to_numpy()
    row_of = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(doc_of, pos_of))}
    drafter = DenseDrafter(store, k=8, dynamic=False)
    checked = ends = 0
    rows = np.array(list(range(0, len(store), 53)) + [len(store) - 3, len(store) - 1])
    every = drafter.anchor_keys(rows, np.full(len(rows), 6))
    for row, anchors in zip(rows.tolist(), every):
        for j in range(6):
            want = row_of.get((int(doc_of[row]), int(pos_of[row]) + 2 + j))
            if want is None:
                assert np.isnan(anchors[j]).all()
                ends += 1
            else:
                np.testing.assert_array_equal(anchors[j], store.keys[want])
                checked += 1
    assert checked > 100 and ends > 0
    # Proposed trees carry anchors for the static chains' nodes. The query is the target's own
    # hidden state at a stored entry (doc, t), recomputed from the document's prefix, so its
    # nearest neighbour is that entry: with k=1 the tree is exactly the entry's chain (never a
    # bare root), each node anchored at the key of the position the token stood at.
    row = next(r for r in range(len(store) // 2, len(store))
               if pos_of[r] >= 30 and (int(doc_of[r]), int(pos_of[r]) + 5) in row_of)
    doc, t = dense_docs[int(doc_of[row])], int(pos_of[row])
    h = torch.from_numpy(hidden_states(target, doc.tokens[: t + 1])[-1])
    assert store.search(store.transform(h.numpy())[None], 1)[1][0, 0] == row     # precondition
    pending = int(store.first_token[row])
    assert pending == doc.tokens[t + 1]
    tree = DenseDrafter(store, k=1, dynamic=False).propose(np.array(doc.tokens[: t + 2]), 8, 4, h)
    assert len(tree) == 5 and tree.is_chain()
    assert list(tree.tokens) == [pending, *doc.tokens[t + 2: t + 6]]
    assert tree.anchor_keys is not None and tree.anchor_keys.shape == (len(tree), store.keys.shape[1])
    assert np.isnan(tree.anchor_keys[0]).all()                                     # the root: none
    for j in range(4):
        np.testing.assert_array_equal(tree.anchor_keys[1 + j], store.keys[row_of[(int(doc_of[row]), t + 2 + j)]])
    # Strict verification never reads anchors: a request's drafter then skips them (the same tree).
    from decoding.engine import Sequence
    from decoding.methods import Datastores, make_drafter
    from decoding.config import SoftGateConfig

    bare = DenseDrafter(store, k=1, dynamic=False)
    bare.anchors = False
    plain = bare.propose(np.array(doc.tokens[: t + 2]), 8, 4, h)
    assert plain.tokens == tree.tokens and plain.parents == tree.parents and plain.anchor_keys is None
    strict = Sequence(target, doc.tokens[:8], drafter=make_drafter("dense", Datastores(dense=store)))
    soft = Sequence(target, doc.tokens[:8], drafter=make_drafter("dense", Datastores(dense=store)),
                    soft=SoftGateConfig())
    assert strict.drafter.anchors is False and soft.drafter.anchors is True
    from decoding.drafters import HybridDrafter, PromptLookupDrafter

    fused = HybridDrafter([(PromptLookupDrafter(), 1.0), (DenseDrafter(store), 2.0)])
    Sequence(target, doc.tokens[:8], drafter=fused)
    assert not fused.anchors and not fused.parts[1][0].anchors                   # down to its parts


def test_dynamic_chains_are_anchored_on_the_requests_own_keys(target):
    """A dynamic-cache chain from position c drafts tokens[c+2:]; its anchors are the cache's keys
    at those positions, NaN where the request has not reached them."""
    import torch

    tf = KeyTransform.fit(np.random.default_rng(0).normal(size=(200, target.config.hidden_size)), dim=8)
    drafter = DenseDrafter(None, transform=tf, dynamic=True, dynamic_k=50)
    tokens = np.array([5, 6, 7, 8, 5, 6, 7, 9, 5, 6])          # pending token 6; committed 0..8
    h = torch.from_numpy(np.random.default_rng(1).normal(size=(9, target.config.hidden_size)).astype(np.float32))
    drafter.begin(list(tokens[:9]), h)
    keys = tf(h.numpy())
    found = drafter._dynamic_chains(keys[8], tokens, 4)
    assert found
    for chain, _, anchors in found:
        c = next(c for c in range(len(tokens) - 2) if tokens[c + 1] == 6 and np.array_equal(tokens[c + 2: c + 2 + len(chain)], chain))
        for j in range(len(chain)):
            if c + 2 + j <= 8:
                np.testing.assert_allclose(anchors[j], keys[c + 2 + j])
            else:
                assert np.isnan(anchors[j]).all()


def test_the_dynamic_cache_takes_up_observed_states_when_it_is_next_searched(target):
    """Observed hidden states wait (steps that draft nothing transform nothing) and join the cache
    at the next search: the chains are those of a cache given every state at once."""
    import torch

    tf = KeyTransform.fit(np.random.default_rng(0).normal(size=(200, target.config.hidden_size)), dim=8)
    tokens = np.array([5, 6, 7, 8, 5, 6, 7, 9, 5, 6])          # pending token 6; committed 0..8
    h = torch.from_numpy(np.random.default_rng(1).normal(size=(9, target.config.hidden_size)).astype(np.float32))
    at_once = DenseDrafter(None, transform=tf, dynamic=True, dynamic_k=50)
    at_once.begin(list(tokens[:9]), h)
    stepwise = DenseDrafter(None, transform=tf, dynamic=True, dynamic_k=50)
    stepwise.begin(list(tokens[:5]), h[:5])
    stepwise.observe(np.arange(5, 7), h[5:7])
    stepwise.observe(np.arange(7, 9), h[7:9])
    assert not stepwise.cached                      # nothing transformed before a search
    q = tf(h[8:9].numpy())[0]
    want, got = at_once._dynamic_chains(q, tokens, 4), stepwise._dynamic_chains(q, tokens, 4)
    assert [c.tolist() for c, _, _ in got] == [c.tolist() for c, _, _ in want] and len(got) >= 2
    np.testing.assert_allclose([w for _, w, _ in got], [w for _, w, _ in want], rtol=1e-5)
    for (_, _, a), (_, _, b) in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_the_query_key_is_the_last_observed_rows_cache_key(target):
    """The engine queries with the last observed hidden state: its key is taken from the dynamic
    cache's catch-up (one transform a step); any other state is transformed on its own."""
    import torch

    tf = KeyTransform.fit(np.random.default_rng(0).normal(size=(200, target.config.hidden_size)), dim=8)
    h = torch.from_numpy(np.random.default_rng(1).normal(size=(9, target.config.hidden_size)).astype(np.float32))
    drafter = DenseDrafter(None, transform=tf, dynamic=True)
    drafter.begin(list(range(7)), h[:7])
    drafter.observe(np.arange(7, 9), h[7:9])
    q = drafter._query(h[8])
    assert not drafter._pn and drafter.cached == 9               # the catch-up ran, once
    np.testing.assert_allclose(q, tf(h[8:9].numpy())[0], rtol=1e-5, atol=1e-6)
    other = drafter._query(h[3])                                       # not the last observed row
    np.testing.assert_allclose(other, tf(h[3:4].numpy())[0], rtol=1e-5, atol=1e-6)
    assert drafter.cached == 9


def test_a_drafter_with_the_dynamic_cache_keeps_the_last_hidden_state_itself(target):
    """With the dynamic cache a dense drafter (and a hybrid of it) keeps the last observed state:
    proposing with `hidden=None` drafts the tree that passing that state drafts (the engine then
    keeps no copy of its own a step); without the cache it cannot, and says so."""
    import torch

    tf = KeyTransform.fit(np.random.default_rng(0).normal(size=(200, target.config.hidden_size)), dim=8)
    tokens = np.array([5, 6, 7, 8, 5, 6, 7, 9, 5, 6])
    h = torch.from_numpy(np.random.default_rng(1).normal(size=(9, target.config.hidden_size)).astype(np.float32))
    for make in (lambda: DenseDrafter(None, transform=tf, dynamic=True, dynamic_k=50),
                 lambda: HybridDrafter([(PromptLookupDrafter(), 1.0),
                                        (DenseDrafter(None, transform=tf, dynamic=True, dynamic_k=50), 2.0)])):
        kept, given = make(), make()
        for d in (kept, given):
            d.begin(list(tokens[:7]), h[:7])
            d.observe(np.arange(7, 9), h[7:9])
        assert kept.keeps_hidden
        a, b = kept.propose(tokens, 8, 4, None), given.propose(tokens, 8, 4, h[8])
        assert a.n_draft >= 2 and a.tokens == b.tokens and a.parents == b.parents
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5)
    assert not DenseDrafter(None, transform=tf, dynamic=False).keeps_hidden
    assert not HybridDrafter([(DenseDrafter(None, transform=tf, dynamic=False), 1.0)]).keeps_hidden


def test_a_dense_drafter_runs_openblas_on_one_thread_and_leaves_torch_alone():
    """numpy's and FAISS's OpenBLAS pools spin on the cores torch's next forward needs
    (decoding/helper_threads.py). In a fresh process: several threads before the first dense
    drafter, one after; torch keeps its thread count (an OpenMP call there would have set it)."""
    import ast
    import os
    import subprocess
    import sys

    code = """
import torch, faiss, numpy as np
from threadpoolctl import threadpool_info
from decoding.drafters import DenseDrafter
from index.dense_format import KeyTransform
torch.set_num_threads(2)
def blas():
    return sorted(i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas")
before = blas()
DenseDrafter(transform=KeyTransform.fit(np.random.default_rng(0).normal(size=(64, 16)).astype("float32"), 4))
print((before, blas(), torch.get_num_threads()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, torch_threads = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert before and min(before) == 2
    assert after == [1] * len(before) and torch_threads == 2


def test_a_large_stores_trained_index_is_cached_and_rebuilt_when_unusable(tmp_path, monkeypatch):
    """Above EXACT_MAX keys, the first load trains the IVF and keeps it under $SENSE_CACHE_DIR; a
    second load reads it (no training) and searches exactly as a fresh build; a truncated file is
    built again; another datastore gets a file of its own; an unwritable cache still loads."""
    from index import dense_store
    from index.dense_synth import synthetic_datastore
    from index.faiss_ops import EXACT_MAX

    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path / "cache"))
    synthetic_datastore(tmp_path / "a", EXACT_MAX + 4_000, seed=1)
    synthetic_datastore(tmp_path / "b", EXACT_MAX + 4_000, seed=2)
    builds = []
    real_build = dense_store.build_faiss_index
    monkeypatch.setattr(dense_store, "build_faiss_index", lambda *a, **k: builds.append(1) or real_build(*a, **k))

    first = DenseStore.load(tmp_path / "a")
    files = sorted((tmp_path / "cache" / dense_store.INDEX_CACHE).glob("*.faiss"))
    assert len(builds) == 1 and len(files) == 1
    second = DenseStore.load(tmp_path / "a")
    assert len(builds) == 1, "the cached index was trained again"
    queries = first.keys[::997] + 0.01
    fresh = real_build(first.keys)
    for store in (first, second):
        sims, ids = store.search(queries, 10)
        want_sims, want_ids = fresh.search(np.ascontiguousarray(queries, dtype=np.float32), 10)
        assert np.array_equal(ids, want_ids) and np.array_equal(sims, want_sims)
    assert second.index.nprobe == first.index.nprobe == dense_store.NPROBE

    files[0].write_bytes(files[0].read_bytes()[:1000])          # truncated: built and written again
    third = DenseStore.load(tmp_path / "a")
    assert len(builds) == 2 and np.array_equal(third.search(queries, 10)[1], fresh.search(queries, 10)[1])
    assert files[0].stat().st_size > 1000

    DenseStore.load(tmp_path / "b")                             # other keys: a file of their own
    assert len(builds) == 3 and len(list(files[0].parent.glob("*.faiss"))) == 2
    lo, hi = 100, 100 + EXACT_MAX + 1                           # an index shard's rows: their own file too
    for _ in range(2):
        part = dense_store.cached_faiss_index(first.manifest, first.keys[lo:hi], rows=(lo, hi))
    assert len(builds) == 4 and len(list(files[0].parent.glob("*.faiss"))) == 3
    assert np.array_equal(part.search(queries, 5)[1], real_build(first.keys[lo:hi]).search(queries, 5)[1])

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("SENSE_CACHE_DIR", str(blocked))       # the cache cannot be written
    assert DenseStore.load(tmp_path / "a").index.ntotal == len(first.keys)
