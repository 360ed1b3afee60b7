"""The sharded FAISS index artifact: built on the real local multi-node Ray cluster from real and
synthetic datastores, loaded locally and from S3 (moto), searched merged and fanned out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index import storage
from index.artifact import (ArtifactError, load_artifact, load_shard, load_sparse, merge_topk, resolve_version,
                            set_current)
from decoding.fingerprint import model_fingerprint
from index.artifact_build import BuildConfig, merge_artifact
from index.artifact_tasks import plan_shards
from index.dense_format import DatastoreError, read_manifest
from index.dense_store import DenseStore
from index.dense_synth import clustered_keys, synthetic_datastore, write_dense_datastore
from index import faiss_ops
from index.faiss_ops import recall_at_k
from pipelines.build_index import build_artifact

REPO = Path(__file__).resolve().parents[1]


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int):
    import faiss

    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(np.ascontiguousarray(keys, np.float32))
    return flat.search(np.ascontiguousarray(queries, np.float32), k)


def assert_same_neighbours(a, b, atol=1e-5):
    """Equal similarities, and equal ids except between neighbours of tied similarity."""
    (sa, ia), (sb, ib) = a, b
    assert sa.shape == sb.shape and ia.shape == ib.shape
    assert np.allclose(sa, sb, atol=atol)
    for r, c in zip(*np.nonzero(ia != ib)):
        tied = np.abs(sa[r] - sa[r, c]) <= atol
        assert tied.sum() >= 2, f"row {r} rank {c}: id {ia[r, c]} vs {ib[r, c]} at untied similarity {sa[r, c]}"


def read_rows(datastore: Path, columns):
    import pyarrow.parquet as pq

    m = read_manifest(datastore)
    tables = [pq.read_table(datastore / s["path"], columns=columns) for s in m.shards]
    return {c: np.concatenate([np.asarray(t.column(c).to_pylist()) for t in tables]) for c in columns}


def build(datastore, output, **kw):
    return build_artifact(BuildConfig(datastore=str(datastore), output=str(output), **kw), progress=None)


# ---------------------------------------------------------------------------------------------
# pure parts


def test_merge_topk_equals_global_topk():
    rng = np.random.default_rng(0)
    sims = rng.random((7, 40)).astype(np.float32)
    ids = np.tile(np.arange(40), (7, 1))
    order = np.argsort(-sims, axis=1)
    want = np.take_along_axis(sims, order, 1)[:, :5], np.take_along_axis(ids, order, 1)[:, :5]
    parts = []
    for cols in np.array_split(rng.permutation(40), 3):                  # three disjoint "shards"
        s, i = sims[:, cols], ids[:, cols]
        o = np.argsort(-s, axis=1)[:, :5]
        parts.append((np.take_along_axis(s, o, 1), np.take_along_axis(i, o, 1)))
    got = merge_topk(parts, 5)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    # fewer candidates than k, missing entries (-1) and ties (to the smaller id)
    s, i = merge_topk([(np.array([[0.5, -np.inf]]), np.array([[7, -1]])), (np.array([[0.5]]), np.array([[3]]))], 4)
    assert i.tolist() == [[3, 7, -1, -1]] and s[0, :2].tolist() == [0.5, 0.5] and np.isneginf(s[0, 2:]).all()
    with pytest.raises(ValueError, match="shard 1"):
        merge_topk([(np.zeros((2, 3)), np.zeros((2, 3))), (np.zeros((3, 3)), np.zeros((3, 3)))], 2)


def test_plan_shards_tiles_the_ids():
    rows = [5, 0, 12, 3]
    for n in (1, 2, 3, 7, 100):
        plan = plan_shards(rows, n)
        assert len(plan) == min(n, 20)
        covered = []
        for start, pieces in plan:
            assert start == len(covered)
            for p in pieces:
                covered += [(p.file, r) for r in range(p.lo, p.hi)]
        assert covered == [(f, r) for f, n_rows in enumerate(rows) for r in range(n_rows)]


def test_remote_storage_errors_are_retried_with_the_configured_delays(monkeypatch):
    """A remote read or write is retried after each configured delay, then fails as one
    StorageError; local errors are not retried; a bad setting is a clear error."""
    calls, slept = [], []
    monkeypatch.setattr(storage.time, "sleep", slept.append)

    def flaky(fail_times):
        def fn():
            calls.append(1)
            if len(calls) <= fail_times:
                raise ConnectionError("endpoint unreachable")
            return b"ok"
        return fn

    monkeypatch.setenv(storage.RETRY_ENV, "0.5, 2")
    assert storage._retrying("s3://b/k", "read", flaky(2)) == b"ok" and slept == [0.5, 2.0]
    calls.clear(), slept.clear()
    with pytest.raises(storage.StorageError, match=r"s3://b/k: could not read \(ConnectionError"):
        storage._retrying("s3://b/k", "read", flaky(3))
    assert len(calls) == 3
    monkeypatch.delenv(storage.RETRY_ENV)
    assert storage.retry_delays() == storage.RETRY_DELAYS_S
    calls.clear()
    with pytest.raises(storage.StorageError):
        storage._retrying("/tmp/local", "read", flaky(1))       # local: one attempt
    assert len(calls) == 1
    monkeypatch.setenv(storage.RETRY_ENV, "1,soon")
    with pytest.raises(storage.StorageError, match="comma-separated seconds"):
        storage.retry_delays()


def test_existence_checks_and_listings_fail_as_one_storage_error(monkeypatch):
    """An outage during a resumed build's check of its finished units' files (``exists``) or a
    listing ended the job with a botocore traceback (exit 1); both are retried like reads and
    writes, then fail as one StorageError (the job's one-line error, exit 2)."""

    class Unreachable:          # stands in for s3fs against a stopped endpoint
        def exists(self, path):
            raise ConnectionError("Could not connect to the endpoint URL")

        def find(self, path):
            raise ConnectionError("Could not connect to the endpoint URL")

    monkeypatch.setattr(storage, "open_fs", lambda uri, storage_options=None: (Unreachable(), "b/k"))
    monkeypatch.setenv(storage.RETRY_ENV, "0")
    with pytest.raises(storage.StorageError, match=r"s3://b/k: could not check \(ConnectionError"):
        storage.exists("s3://b/k")
    with pytest.raises(storage.StorageError, match=r"s3://b/k: could not check"):
        storage.list_files("s3://b/k")
    monkeypatch.setattr(Unreachable, "exists", lambda self, path: True)
    with pytest.raises(storage.StorageError, match=r"s3://b/k: could not list \(ConnectionError"):
        storage.list_files("s3://b/k")
    monkeypatch.setattr(Unreachable, "isfile", lambda self, path: (_ for _ in ()).throw(
        ConnectionError("Unable to locate credentials")), raising=False)
    from index.artifact import check_artifact_root                  # build_index's check of --output
    with pytest.raises(storage.StorageError, match=r"s3://b/k: could not list \(ConnectionError"):
        check_artifact_root("s3://b/k")


# ---------------------------------------------------------------------------------------------
# real datastore (the embedded model's keys)


@pytest.fixture(scope="module")
def real_artifact(ray_cluster, dense_store_dir, tmp_path_factory):
    """The real datastore as a fanned-out artifact of 3 exact shards (v0001), then merged (v0002)."""
    root = tmp_path_factory.mktemp("artifacts") / "real"
    result = build(dense_store_dir, root, shards=3, merge=False)
    merged = merge_artifact(str(root), progress=None)
    return root, result, merged


def test_real_artifact_matches_dense_store(target, dense_store_dir, dense_docs, real_artifact):
    root, result, merged_uri = real_artifact
    store = DenseStore.load(dense_store_dir)
    fp = model_fingerprint(target)
    sharded = load_artifact(root, fp, version="v0001")
    merged = load_artifact(root, fp)                                    # CURRENT -> v0002
    assert merged.root == Path(merged_uri) and merged.manifest.merged and len(merged.shards) == 1
    assert len(sharded.shards) == 3 and not sharded.manifest.merged and sharded.manifest.factory == "Flat"
    m = sharded.manifest
    assert (m.entries, m.documents, m.key_dim, m.value_len) == (len(store), len(dense_docs), 32, 8)
    assert m.fingerprint == read_manifest(dense_store_dir).fingerprint and m.layer == fp.layer
    for art in (sharded, merged):
        assert len(art) == len(store) and isinstance(art.values, np.memmap)
        assert np.array_equal(art.values, store.values) and np.array_equal(art.first_token, store.first_token)
        assert np.array_equal(art.transform.components, store.transform.components)
        queries = store.keys[::97] + 0.02 * np.random.default_rng(0).standard_normal((len(store.keys[::97]), 32))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        assert_same_neighbours(art.search(queries, 10), store.search(queries, 10))
    # one shard alone answers with global ids from its own range
    shard = load_shard(root, 2, version="v0001")
    sims, ids = shard.search(store.keys[-3:], 1)
    assert ids[:, 0].tolist() == [len(store) - 3, len(store) - 2, len(store) - 1] and np.allclose(sims, 1, atol=1e-4)
    assert shard.id_start > 0 and shard.id_start + shard.rows == len(store)


def test_real_artifact_sparse_equals_rest_over_the_answers(target, dense_docs, real_artifact):
    from index.sparse import SparseIndex

    root, _, _ = real_artifact
    sparse = load_sparse(root)
    answers = [d.tokens[d.store_from:] for d in dense_docs]
    reference = SparseIndex.build(answers)
    assert (sparse.n_tokens, sparse.n_docs) == (reference.n_tokens, reference.n_docs)
    rng = np.random.default_rng(0)
    for doc in (answers[i] for i in rng.choice(len(answers), 8, replace=False)):
        cut = int(rng.integers(3, len(doc) - 1))
        context = list(dense_docs[0].tokens[:5]) + list(doc[:cut])
        assert sparse.lookup(context) == reference.lookup(context)
        assert sparse.lookup(context).match_len >= 2


def test_dense_drafting_from_the_artifact_equals_greedy(target, real_artifact):
    """The decoding side takes the artifact as its dense store: strict drafting stays exact and
    drafts the same as with the in-memory DenseStore."""
    from decoding.config import SamplingParams
    from decoding.drafters import DenseDrafter, NoDrafter
    from decoding.engine import encode_prompt, generate
    from index.corpus import gsm8k

    root, _, _ = real_artifact
    artifact = load_artifact(root, model_fingerprint(target), version="v0001")
    params = SamplingParams(max_new_tokens=16)
    accepted = 0
    for q in [r["question"] for r in gsm8k("train")[:1]]:                 # in the datastore: drafts hit
        ids = encode_prompt(target, q)
        ref = generate(target, ids, params=params, drafter=NoDrafter()).token_ids
        r = generate(target, ids, params=params, drafter=DenseDrafter(artifact, dynamic=False), budget=12)
        assert r.token_ids == ref
        accepted += r.stats.accepted
    assert accepted > 0


def test_real_keys_ivf_recall_and_merged_build(ray_cluster, dense_store_dir, tmp_path, monkeypatch):
    """IVF on the real keys: hold 5 documents out as queries, index the rest (merged on disk
    from 2 shards), calibrated nprobe reaches recall@10 >= 0.95 against exact search."""
    rows = read_rows(dense_store_dir, ["key", "value", "doc_id", "position"])
    m = read_manifest(dense_store_dir)
    held = rows["doc_id"] >= rows["doc_id"].max() - 4
    keys = np.stack(rows["key"]).astype(np.float32)
    ds = tmp_path / "real-minus-5"
    write_dense_datastore(ds, keys=keys[~held], values=np.stack(rows["value"])[~held], doc_id=rows["doc_id"][~held],
                          position=rows["position"][~held], fingerprint=m.fingerprint, eos_token_id=m.eos_token_id,
                          shard_rows=1000)
    result = build(ds, tmp_path / "ivf", factory="IVF32,Flat", shards=2, merge=True, sparse=False)
    art = load_artifact(tmp_path / "ivf")
    assert art.manifest.merged and art.shards[0].index.ntotal == (~held).sum()
    assert art.manifest.dense_shards[0].data is not None                    # on-disk inverted lists
    assert result.manifest.recall_at_10 >= 0.96 and 1 <= art.nprobe < 32
    queries = keys[held]
    _, truth = exact_search(keys[~held], queries, 10)
    recall = recall_at_k(art.search(queries, 10)[1], truth)
    assert recall >= 0.95, (recall, art.nprobe)
    # Read into memory (searches through mapped lists are slow); mapped only above the size cap,
    # with the same answers.
    assert lists_kind(art) == "ArrayInvertedLists"
    monkeypatch.setattr(faiss_ops, "IN_MEMORY_MAX", 0)
    mapped = load_artifact(tmp_path / "ivf")
    assert lists_kind(mapped) == "OnDiskInvertedLists"
    assert_same_neighbours(mapped.search(queries, 10), art.search(queries, 10))


def lists_kind(art) -> str:
    import faiss

    return type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(art.shards[0].index).invlists)).__name__


def test_auto_factory_gives_every_list_its_training_keys(tmp_path):
    """Just above EXACT_MAX keys, about 4 sqrt(E) lists would ask for more training keys than the
    store has (16,385 keys: 512 lists, 20,480 keys): the rule halves the lists instead, for the
    artifact builder (which refused such stores) and the local dense store alike."""
    import faiss

    from index.artifact_build import check_build
    from index.dense_store import build_faiss_index

    for e in [faiss_ops.EXACT_MAX + 1, 20_479, 20_480, *range(faiss_ops.EXACT_MAX + 1, 10 ** 6, 9_973)]:
        nlist = faiss_ops.parse_nlist(faiss_ops.choose_factory(e, 64))
        assert nlist >= 16 and nlist * faiss_ops.MIN_TRAIN_PER_LIST <= e, (e, nlist)
    e = faiss_ops.EXACT_MAX + 1
    synthetic_datastore(tmp_path / "ds", e)
    _, _, factory = check_build(BuildConfig(datastore=str(tmp_path / "ds"), output=str(tmp_path / "art")))
    assert factory == "IVF256,Flat"
    index = build_faiss_index(clustered_keys(e, 64, seed=1))
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == 256 and index.ntotal == e


def test_an_index_file_is_read_into_memory_or_mapped(tmp_path):
    """faiss_ops.read_index: an IVF file's lists mapped (mmap=True) or in memory, a merged
    on-disk one's copied into memory (lists_into_memory); the same neighbours every way."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    keys = clustered_keys(4000, 16, seed=5)
    trained = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(keys)
    faiss_ops.write_index(trained, tmp_path / "trained.faiss")
    part = faiss.clone_index(trained)
    part.add_with_ids(keys, np.arange(len(keys)))
    faiss_ops.write_index(part, tmp_path / "part.faiss")
    merged = faiss_ops.read_index(tmp_path / "trained.faiss", mmap=False)
    merge_ondisk(merged, [str(tmp_path / "part.faiss")], str(tmp_path / "merged.ivfdata"))
    faiss_ops.write_index(merged, tmp_path / "merged.faiss")
    want = part.search(keys[:50], 10)
    for path, ondisk in (("part.faiss", False), ("merged.faiss", True)):
        for mmap, kind in ((True, "OnDiskInvertedLists"), (False, "ArrayInvertedLists")):
            index = faiss_ops.read_index(tmp_path / path, ondisk=ondisk, mmap=mmap)
            assert type(faiss.downcast_InvertedLists(index.invlists)).__name__ == kind, (path, mmap)
            assert_same_neighbours(index.search(keys[:50], 10), want)


# ---------------------------------------------------------------------------------------------
# synthetic 100k x 64 (clustered), IVF chosen by size


def test_synthetic_100k_recall_and_shard_merge_equivalence(ray_cluster, tmp_path):
    import faiss

    keys = clustered_keys(101_000, 64, seed=3)
    base, queries = keys[:100_000], keys[100_000:]
    ds = tmp_path / "ds"
    synthetic_datastore(ds, 100_000, keys=base, shard_rows=30_000)
    root = tmp_path / "art"
    t = time.time()
    result = build(ds, root, shards=4, merge=False, sparse_shards=2)
    build_s = time.time() - t
    sharded = load_artifact(root)
    assert sharded.manifest.factory == "IVF1024,Flat" and len(sharded.shards) == 4
    merge_artifact(str(root), progress=None)
    merged = load_artifact(root)
    assert merged.manifest.merged and merged.nprobe == sharded.nprobe == result.manifest.nprobe

    # one IVF over all the data, same trained quantizer and nprobe
    single = faiss.read_index(str(sharded.root / "dense/trained.faiss"))
    single.add_with_ids(base, np.arange(len(base)))
    faiss.extract_index_ivf(single).nprobe = sharded.nprobe
    want = single.search(queries, 10)
    assert_same_neighbours(sharded.search(queries, 10), want)
    assert_same_neighbours(merged.search(queries, 10), want)

    _, truth = exact_search(base, queries, 10)
    recall = recall_at_k(merged.search(queries, 10)[1], truth)
    assert recall >= 0.95, (recall, merged.nprobe)
    assert sharded.nprobe <= 64, "calibration chose an nprobe far beyond what this data needs"

    # the sparse shards answer like one index over the same streams
    from index.sparse import SparseIndex
    from index.sparse_shards import ShardedSparseIndex, token_streams

    rows = read_rows(ds, ["doc_id", "position", "first_token"])
    one = SparseIndex.build(token_streams(rows["doc_id"], rows["position"], rows["first_token"]))
    sparse = merged.sparse
    assert isinstance(sparse, ShardedSparseIndex) and sparse.n_tokens == one.n_tokens == 100_000
    tokens = np.asarray(one.tokens)
    for start in range(0, 5000, 500):
        context = tokens[start:start + 6].tolist()
        assert sparse.lookup(context) == one.lookup(context)
    print(f"\nsynthetic 100k build: {build_s:.1f}s, nprobe {merged.nprobe}, recall@10 {recall:.3f}")


def test_wide_token_ids_in_values_and_sparse(ray_cluster, tmp_path):
    """Token ids beyond 16 bits (a 200k vocabulary) survive values, first_token and the REST index."""
    ds = tmp_path / "wide"
    synthetic_datastore(ds, 3000, dim=16, value_len=4, vocab=200_000, eos_token_id=199_999, shard_rows=1000)
    build(ds, tmp_path / "art", shards=2)
    art = load_artifact(tmp_path / "art")
    store = DenseStore.load(ds)
    assert art.values.max() > 65_535 and np.array_equal(art.values, store.values)
    doc = np.asarray(art.sparse.tokens[:20])
    assert doc.max() > 65_535 and art.sparse.lookup(doc[:8].tolist()).match_len == 8


def test_sparse_from_the_datastores_token_streams(ray_cluster, tmp_path):
    """A datastore with token streams (tokens/*.parquet, as pipelines.build_datastore writes them):
    the REST index holds each document's stored part tokens[store_from:], in 2 shards."""
    import pyarrow.parquet as pq

    from index.dense_build import Document
    from index.dense_format import sha256_file
    from index.dense_writer import tokens_table, write_manifest
    from index.dense_synth import synthetic_documents
    from index.sparse import SparseIndex

    ds = tmp_path / "ds"
    synthetic_datastore(ds, 3000, dim=16, value_len=4, shard_rows=1000, seed=5)
    docs = [Document(d.tolist(), corpus="synthetic", store_from=i % 3) for i, d in
            enumerate(synthetic_documents(3000, seed=5))]
    (ds / "tokens").mkdir()
    pq.write_table(tokens_table(range(len(docs)), docs), ds / "tokens/part-00000.parquet")
    m = read_manifest(ds)
    m.token_shards = [{"path": "tokens/part-00000.parquet", "rows": len(docs),
                       "sha256": sha256_file(ds / "tokens/part-00000.parquet")}]
    write_manifest(ds, m)
    build(ds, tmp_path / "art", shards=2, sparse_shards=2)
    sparse = load_sparse(tmp_path / "art")
    reference = SparseIndex.build([d.tokens[d.store_from:] for d in docs])
    assert sparse.n_tokens == reference.n_tokens == sum(len(d.tokens) - d.store_from for d in docs)
    for d in docs[:20]:
        context = d.tokens[d.store_from:][:5]
        assert sparse.lookup(context) == reference.lookup(context) and sparse.lookup(context).match_len == 5


# ---------------------------------------------------------------------------------------------
# failures: corrupt, truncated, mismatched, unsafe


@pytest.fixture
def copy_of(real_artifact, tmp_path):
    """A private copy of the real artifact root (v0001 sharded, v0002 merged, CURRENT)."""
    root, _, _ = real_artifact
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def edit_manifest(version_dir: Path, edit) -> None:
    m = json.loads((version_dir / "manifest.json").read_text())
    edit(m)
    (version_dir / "manifest.json").write_text(json.dumps(m))


def test_corrupt_or_truncated_files_are_refused(copy_of):
    v1 = copy_of / "v0001"
    values = v1 / "values.npy"
    data = bytearray(values.read_bytes())
    data[-5] ^= 0xFF
    values.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"values\.npy: sha256 mismatch"):
        load_artifact(v1)
    shard = v1 / "dense/shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"shard-00001\.faiss: 1000 bytes, the manifest says \d+ \(truncated"):
        load_shard(v1, 1, verify=False)                                  # sizes are checked even so
    garbage = v1 / "dense/shard-00000.faiss"
    garbage.write_bytes(b"\0" * garbage.stat().st_size)
    edit_manifest(v1, lambda m: m["dense_shards"][0]["index"].update(
        sha256=__import__("hashlib").sha256(garbage.read_bytes()).hexdigest()))
    with pytest.raises(ArtifactError, match=r"shard-00000\.faiss: unreadable FAISS index"):
        load_shard(v1, 0)
    (copy_of / "v0002" / "first_token.npy").unlink()
    with pytest.raises(ArtifactError, match=r"first_token\.npy: listed in the manifest but missing"):
        load_artifact(copy_of)


def test_mismatched_model_or_format_is_refused(target, copy_of, dense_store_dir):
    with pytest.raises(ArtifactError, match="a dense datastore's manifest, not an index artifact's"):
        load_artifact(dense_store_dir)                                    # the datastore given for its artifact
    with pytest.raises(ArtifactError, match=r"has no version v0009 \(its versions: v0001, v0002\)"):
        resolve_version(copy_of, "v0009")
    fp = model_fingerprint(target)
    for change in ({"weights_hash": "0" * 16}, {"tokenizer_hash": "f" * 16}, {"layer": 7}):
        other = type(fp)(**{**fp.__dict__, **change})
        with pytest.raises(ArtifactError, match="built for another"):
            load_artifact(copy_of, other)
        with pytest.raises(DatastoreError):                                # the base class catches it too
            load_shard(copy_of, 0, other)
    edit_manifest(copy_of / "v0002", lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(copy_of)
    (copy_of / "v0002" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        load_artifact(copy_of)
    (copy_of / "v0002" / "manifest.json").unlink()                       # an unfinished publication
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(copy_of)
    (copy_of / "CURRENT").unlink()
    with pytest.raises(ArtifactError, match="not an index artifact"):
        load_artifact(copy_of)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "dense/../../x.npy", "..", "C:/x",
                                  "dense\\..\\x", ""])
def test_manifest_paths_may_not_leave_the_artifact(copy_of, path):
    edit_manifest(copy_of / "v0002", lambda m: m["values"].update(path=path))
    with pytest.raises(ArtifactError, match="artifact directory|non-empty"):
        load_artifact(copy_of)


def test_symlinks_and_pointers_may_not_leave_the_artifact(copy_of, tmp_path):
    v2 = copy_of / "v0002"
    outside = tmp_path / "outside.npy"
    shutil.copyfile(v2 / "values.npy", outside)
    (v2 / "values.npy").unlink()
    (v2 / "values.npy").symlink_to(outside)
    with pytest.raises(ArtifactError, match="points outside"):
        load_artifact(v2)
    (copy_of / "CURRENT").write_text("../elsewhere\n")
    with pytest.raises(ArtifactError, match="not a version directory"):
        load_artifact(copy_of)
    with pytest.raises(ArtifactError, match="not a version name"):
        load_artifact(copy_of, version="../v0001")
    set_current(copy_of, "v0001")
    assert resolve_version(copy_of) == str(copy_of / "v0001")
    assert not load_artifact(copy_of).manifest.merged


def test_corrupt_datastore_fails_the_build_clearly(ray_cluster, dense_store_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dense_store_dir, bad)
    shard = bad / read_manifest(bad).shards[1]["path"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatastoreError, match=r"part-00001\.parquet: sha256 mismatch") as err:
        build(bad, tmp_path / "out", shards=2)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert not (tmp_path / "out" / "CURRENT").exists() and not list((tmp_path / "out").glob("v*"))


# ---------------------------------------------------------------------------------------------
# S3, CLI, Ray job


def test_s3_build_publish_and_load(ray_cluster, s3_server, dense_store_dir, tmp_path):
    """Datastore on S3 -> build on the cluster (workers get the endpoint) -> artifact on S3 ->
    loaded through the local cache, checksum-verified; a corrupted remote file is refused."""
    s3_server.make_bucket("index-test")
    ds_uri, out_uri = "s3://index-test/datastore", "s3://index-test/artifact"
    for rel in storage.list_files(dense_store_dir):
        storage.upload_file(dense_store_dir / rel, storage.join(ds_uri, rel))
    build(ds_uri, out_uri, shards=2, merge=False)
    build(ds_uri, out_uri, shards=1, make_current=False)
    assert storage.read_bytes(storage.join(out_uri, "CURRENT")) == b"v0001\n"
    assert storage.exists(storage.join(out_uri, "v0002", "manifest.json"))
    store = DenseStore.load(dense_store_dir)
    cache = tmp_path / "cache"
    art = load_artifact(out_uri, cache_dir=cache)
    assert art.root.is_relative_to(cache) and len(art.shards) == 2
    assert np.array_equal(art.values, store.values)
    assert_same_neighbours(art.search(store.keys[:50], 5), store.search(store.keys[:50], 5))
    shard = load_shard(out_uri, 1, cache_dir=tmp_path / "cache2")           # fetches only its files
    assert sorted(p.name for p in (tmp_path / "cache2").rglob("*") if p.is_file() and p.suffix != ".lock") == \
        ["manifest.json", "shard-00001.faiss"]
    assert shard.search(store.keys[-1:], 1)[1][0, 0] == len(store) - 1
    assert load_sparse(out_uri, cache_dir=cache).n_tokens == art.manifest.entries
    storage.write_bytes_atomic(storage.join(out_uri, "v0001", "values.npy"), b"\x93NUMPY" + b"\0" * 100)
    with pytest.raises(ArtifactError, match="values.npy"):
        load_artifact(out_uri, cache_dir=tmp_path / "cache3")
    from index.artifact import check_artifact_root                          # an --output on S3 too:
    check_artifact_root(out_uri)                                              # a root takes its next version
    for uri, message in ((ds_uri, "holds a manifest.json"), (storage.join(ds_uri, "manifest.json"), "is a file")):
        with pytest.raises(ArtifactError, match=message):
            check_artifact_root(uri)
    # The build's tasks got the endpoint through their runtime env, never the credentials (a
    # runtime env is readable by anyone with the dashboard or the state API).
    from ray.util.state import list_tasks

    envs = [json.dumps(t.get("runtime_env_info") or {}, default=str)
            for t in list_tasks(address=ray_cluster.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
            if t.get("func_or_class_name") in ("sample_task", "add_task", "sparse_task")]
    assert envs and any("AWS_ENDPOINT_URL" in e for e in envs)
    assert not any("AWS_SECRET_ACCESS_KEY" in e or "AWS_ACCESS_KEY_ID" in e for e in envs)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipelines.build_index", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})


@pytest.mark.parametrize("args, message", [
    (["--datastore", "/nonexistent/ds"], "not a datastore"),
    (["--factory", "IVFbogus"], "not valid"),
    (["--factory", "IVF65536,Flat"], "need at least"),
    (["--nprobe", "0"], "--nprobe must be >= 1"),
])
def test_cli_bad_input_is_one_line_and_exit_2(dense_store_dir, tmp_path, args, message):
    base = {"--datastore": str(dense_store_dir), "--output": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    r = run_cli(*[x for kv in base.items() for x in kv])
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("build_index: error:") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_an_output_that_is_not_an_artifact_root_is_refused_before_any_work(dense_store_dir, real_artifact,
                                                                         tmp_path, capsys):
    """--output must be absent, empty or an artifact root: a file, the datastore itself, a version
    folder or a folder of other things is one line (exit 2) and nothing is written there."""
    from index.artifact import check_artifact_root
    from pipelines.build_index import main

    root = real_artifact[0]
    (tmp_path / "file.txt").write_text("x")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep")
    ds_files = sorted(os.listdir(dense_store_dir))
    for out, message in {tmp_path / "file.txt": "is a file", Path(dense_store_dir): "holds a manifest.json",
                         root / "v0001": "holds a manifest.json", home: "holds other files (notes.txt)"}.items():
        assert main(["--datastore", str(dense_store_dir), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("build_index: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(home) == ["notes.txt"] and sorted(os.listdir(dense_store_dir)) == ds_files
    (tmp_path / "empty").mkdir()
    for ok in (root, tmp_path / "empty", tmp_path / "absent"):    # a root takes its next version
        check_artifact_root(str(ok))


def test_ray_job_submit_builds_an_artifact(ray_cluster, dense_store_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job-artifact"
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    deadline = time.time() + 180
    while True:                          # the job agent may need a moment after the cluster starts
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m pipelines.build_index --datastore {dense_store_dir} --output {out} "
                           f"--shards 2 --no-merge --no-sparse",
                runtime_env={"working_dir": str(REPO), "excludes": ["tests/", "notebooks/", "bench/", "*.ipynb"]})
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in time"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "[build_index] shard 2/2 added" in logs and "published" in logs
    art = load_artifact(out)
    assert len(art.shards) == 2 and not art.manifest.sparse_shards and len(art) == len(DenseStore.load(dense_store_dir))
