"""The Ray Data datastore pipeline: unit planning, windows, equality with the single-process
builder, S3 in and out, resume after a kill, and `ray job submit` (real local multi-node cluster,
real moto S3 server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from index.corpus import gsm8k
from index.records import CorpusSpec, FieldMap, InputError, plan_units, read_unit
from support.datastore import build_cli, read_entries, write_gsm8k_corpus
from support.net import free_port

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("corpus") / "pairs.jsonl"
    return path, write_gsm8k_corpus(path, N_DOCS)


def _config(corpus_uri: str, output: str, **kw):
    from pipelines.config import DatastoreJobConfig

    fields = FieldMap(prompt="question", response="answer")
    # float32, not "auto": the builds are compared with the single-process builder on the float32
    # `target` fixture, and "auto" takes bfloat16 where it measures faster (a CI machine did).
    base = dict(corpora=(CorpusSpec("gsm", corpus_uri, "jsonl", fields),), output=output, dim=32, value_len=8,
                split_bytes=2048, workers=2, cpus_per_worker=1.0, dtype="float32")
    base.update(kw)
    return DatastoreJobConfig(**base)


# -- pure parts (no Ray) ---------------------------------------------------------------------

@pytest.mark.parametrize("split", [1, 7, 64, 300, 1 << 20])
def test_units_read_every_line_exactly_once(tmp_path, split):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"record {i} " + "x" * (i * 13 % 50)}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    units = plan_units([CorpusSpec("c", str(path))], split_bytes=split)
    assert [u.name for u in units] == [u.name for u in plan_units([CorpusSpec("c", str(path))], split)]  # stable

    class Tok:
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [len(text), 1, 2]}

    seen = []
    for u in units:
        recs = read_unit(u, FieldMap(), Tok(), eos=None)
        assert not recs.bad
        seen.extend(d.doc_id for d in recs.documents)
    assert len(seen) == 40 and len(set(seen)) == 40


def test_bad_records_are_counted_by_reason(tmp_path, target):
    path = tmp_path / "c.jsonl"
    write_gsm8k_corpus(path, n=7)
    (unit,) = plan_units([CorpusSpec("c", str(path), fields=FieldMap(prompt="question", response="answer"))])
    recs = read_unit(unit, FieldMap(prompt="question", response="answer"), target.tokenizer, eos=2)
    assert len(recs.documents) == 7
    assert recs.bad == Counter({"invalid JSON": 1, "missing field 'answer'": 1, "empty 'answer'": 1})


def test_formats_text_parquet_messages(tmp_path, target):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from decoding.engine import encode_prompt

    (tmp_path / "a.txt").write_text("Plain text document one.")
    pq.write_table(pa.table({"text": ["row one", "row two", None]}), tmp_path / "b.parquet", row_group_size=2)
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"messages": []}) + "\n")
    tok = target.tokenizer
    units = plan_units([CorpusSpec("t", str(tmp_path / "a.txt")), CorpusSpec("p", str(tmp_path / "b.parquet"))])
    assert [u.format for u in units] == ["parquet", "parquet", "text"]      # sorted by corpus name
    docs = [d for u in units for d in read_unit(u, FieldMap(), tok, eos=2).documents]
    assert [tok.decode(d.tokens) for d in docs] == ["row one", "row two", "Plain text document one."]
    bad = sum((read_unit(u, FieldMap(), tok, eos=2).bad for u in units), Counter())
    assert bad == Counter({"missing field 'text'": 1})
    (u,) = plan_units([CorpusSpec("m", str(tmp_path / "c.jsonl"))])
    recs = read_unit(u, FieldMap(messages="messages"), tok, eos=2)
    (doc,) = recs.documents
    prompt = encode_prompt(target, "Hi?")
    assert doc.tokens == prompt + tok("Hello.")["input_ids"] + [2] and doc.store_from == len(prompt)
    assert sum(recs.bad.values()) == 1


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_units([CorpusSpec("x", str(tmp_path / "missing.jsonl"))])
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no input files"):
        plan_units([CorpusSpec("x", str(tmp_path / "d"))])
    (tmp_path / "f.bin").write_bytes(b"\0\1")
    with pytest.raises(InputError, match="format"):
        plan_units([CorpusSpec("x", str(tmp_path / "f.bin"))])
    with pytest.raises(InputError, match="prompt field"):
        FieldMap(response="answer").mode()


def test_a_corpus_on_storage_it_cannot_reach_is_one_storage_error(monkeypatch):
    """A corpus on S3 without credentials (or an endpoint down) ended the job in a botocore
    traceback: the corpus check is retried like every storage call, then one StorageError."""
    from index import storage

    class Unreachable:          # s3fs without credentials
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise PermissionError("Unable to locate credentials")
            return fail

    monkeypatch.setattr(storage, "open_fs", lambda uri, storage_options=None: (Unreachable(), "b/c.jsonl"))
    monkeypatch.setenv(storage.RETRY_ENV, "0")
    with pytest.raises(storage.StorageError, match=r"s3://b/c.jsonl: could not check \(PermissionError"):
        plan_units([CorpusSpec("x", "s3://b/c.jsonl")])


def test_windows_cover_entry_positions_once():
    from index.dense_build import Document, entry_positions, windows

    for n, store_from, max_len, overlap in [(10, 0, 4, 2), (100, 37, 16, 5), (5, 0, 64, 32), (50, 45, 8, 0),
                                            (9, 0, 2, 1)]:
        ws = windows(n, store_from, max_len, overlap)
        stored = [p for s, e, lo in ws for p in range(lo, min(e, n - 1))]
        assert stored == list(entry_positions(Document(list(range(n)), store_from=store_from)))
        for s, e, lo in ws:
            assert e - s <= max_len and (s == 0 or lo - s >= overlap)


def test_windowed_batched_extraction_matches_prefill(target):
    """Each stored key equals the transform of a plain prefill of its window (batching and padding
    change nothing beyond float rounding)."""
    from decoding.dense_extract import extract_entries, hidden_states
    from index.dense_build import Document, windows
    from index.dense_format import KeyTransform

    rng = np.random.default_rng(0)
    docs = [Document(rng.integers(3, 5000, size=n).tolist(), store_from=s) for n, s in [(40, 0), (25, 10), (7, 0)]]
    sample = np.concatenate([hidden_states(target, d.tokens) for d in docs])
    tf = KeyTransform.fit(sample, dim=16)
    ex = extract_entries(target, tf, docs, [0, 1, 2], value_len=4, eos=2, max_len=16, overlap=6, batch_tokens=40)
    row = 0
    for i, d in enumerate(docs):
        for s, e, lo in windows(len(d.tokens), d.store_from, 16, 6):
            h = hidden_states(target, d.tokens[s:e])
            hi = min(e, len(d.tokens) - 1)
            np.testing.assert_allclose(ex.keys[row: row + hi - lo], tf(h[lo - s: hi - s]), atol=2e-4)
            assert (ex.positions[row: row + hi - lo] == np.arange(lo, hi)).all()
            row += hi - lo
    assert row == len(ex.keys)


def test_states_at_hand_stand_in_for_the_forward_only_where_they_are_its(target):
    """``states_by_window``: a document's given hidden states replace the forward where they are
    its entry positions' rows and the document fits one window; a document too long for one
    window, states of the wrong length, or none run the forward (:func:`run_windows`)."""
    from decoding.dense_extract import hidden_states, run_windows, states_by_window
    from index.dense_build import Document, entry_positions

    rng = np.random.default_rng(1)
    docs = [Document(rng.integers(3, 5000, size=n).tolist(), store_from=s) for n, s in
            [(30, 12), (14, 5), (40, 20), (20, 8), (16, 6)]]
    given = [hidden_states(target, d.tokens)[entry_positions(d)] for d in docs]
    states = [given[0], given[1] + 1.0, np.zeros((3, given[2].shape[1]), np.float32), None, given[4]]
    # doc 1: shifted states, used (as given); doc 2: 40 tokens > max_len 32, and doc 2's and 3's
    # states are unusable: the forward's; doc 4: its own, used.
    got = states_by_window(target, docs, states, max_len=32, overlap=8, batch_tokens=64)
    ref = run_windows(target, docs, max_len=32, overlap=8, batch_tokens=64, fn=lambda h: h)
    assert (got[0][0] == ref[0][0]).all() and (got[4][0] == ref[4][0]).all()
    assert (got[1][0] == given[1] + 1.0).all()
    for i in (2, 3):
        assert len(got[i]) == len(ref[i]) and all((a == b).all() for a, b in zip(got[i], ref[i]))
    assert len(ref[2]) == 2                                 # two windows: the states could not be its


# -- on the Ray cluster ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_output(ray_cluster, corpus, tmp_path_factory):
    """A build whose first pass samples only the first unit: most units go through the actors."""
    from pipelines.build_datastore import build_datastore

    out = tmp_path_factory.mktemp("pipe") / "ds"
    manifest = build_datastore(_config(str(corpus[0]), str(out), sample_rows=200, worker_resources={"slot": 1}))
    return out, manifest


def _builder_docs(target, rows):
    """The single-process builder's documents, made independently of the pipeline's reader."""
    from decoding.engine import encode_prompt
    from index.dense_build import Document

    docs = []
    for r in rows:
        prompt = encode_prompt(target, r["question"])
        docs.append(Document(prompt + target.tokenizer(r["answer"])["input_ids"] + [2], corpus="gsm",
                             store_from=len(prompt)))
    return docs


def test_pipeline_equals_single_process_builder(pipeline_output, corpus, target, tmp_path):
    """Same corpus and key transform, both builders: keys within float tolerance, values exact,
    same counts (units of the first pass and of the extraction actors alike)."""
    from decoding.dense_extract import build_dense_datastore
    from index.dense_format import KeyTransform

    out, manifest = pipeline_output
    phases = Counter(json.loads(p.read_text())["phase"] for p in (out / "units").glob("*.json"))
    assert phases["fit"] >= 1 and phases["extract"] >= 2
    transform = KeyTransform.load(out / "transform.npz")
    ref_manifest = build_dense_datastore(target, _builder_docs(target, corpus[1]), tmp_path / "ref", dim=32,
                                         value_len=8, transform=transform)
    ours, ref = read_entries(str(out)), read_entries(str(tmp_path / "ref"))
    assert manifest.entries == ref_manifest.entries == len(ours["key"]) == len(ref["key"])
    assert manifest.documents == N_DOCS and manifest.skipped == 3
    assert manifest.skipped_reasons == {"invalid JSON": 1, "missing field 'answer'": 1, "empty 'answer'": 1}
    assert manifest.fingerprint == ref_manifest.fingerprint
    # Documents in file order on both sides; the pipeline's ids are (file, byte offset).
    rank = {d: i for i, d in enumerate(np.unique(ours["doc_id"]))}
    assert [rank[d] for d in ours["doc_id"]] == ref["doc_id"].tolist()
    assert (ours["position"] == ref["position"]).all()
    assert (ours["value"] == ref["value"]).all() and (ours["first_token"] == ref["first_token"]).all()
    np.testing.assert_allclose(ours["key"], ref["key"], atol=2e-3)
    cos = (ours["key"] * ref["key"]).sum(1)
    assert cos.min() > 0.999
    # And the datastore loads for retrieval, with the compatibility check.
    from decoding.fingerprint import model_fingerprint
    from index.dense_store import DenseStore

    store = DenseStore.load(out, expect=model_fingerprint(target))
    assert len(store) == manifest.entries
    assert len(manifest.token_shards) >= 1


def test_workers_ran_on_both_nodes(pipeline_output):
    """Two extraction actors, one per node (a per-node resource): units were extracted on both."""
    out, _ = pipeline_output
    nodes = {json.loads(p.read_text())["node"] for p in (out / "units").glob("*.json")}
    assert len(nodes) == 2


def test_rerun_resumes_and_changed_settings_are_refused(pipeline_output, corpus):
    from pipelines.build_datastore import build_datastore

    out, manifest = pipeline_output
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = build_datastore(_config(str(corpus[0]), str(out), sample_rows=200))
    assert again.shards == manifest.shards and again.entries == manifest.entries
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before     # nothing recomputed
    with pytest.raises(InputError, match="other settings"):
        build_datastore(_config(str(corpus[0]), str(out), sample_rows=200, dim=16))


def test_s3_in_and_out_and_the_transform_fit_equals_the_builders(ray_cluster, s3_server, corpus, target,
                                                                   tmp_path):
    """Corpus read from and datastore written to a real S3-compatible server. The whole corpus
    fits in the first pass's sample, so its transform must equal the single-process builder's
    own fit: the two datastores then agree entry for entry."""
    from index import storage
    from decoding.dense_extract import build_dense_datastore
    from pipelines.build_datastore import build_datastore

    s3_server.make_bucket("corpora")
    s3_server.make_bucket("stores")
    storage.upload_file(corpus[0], "s3://corpora/gsm/pairs.jsonl")
    manifest = build_datastore(_config("s3://corpora/gsm/", "s3://stores/gsm-ds", workers=1))
    build_dense_datastore(target, _builder_docs(target, corpus[1]), tmp_path / "ref", dim=32, value_len=8)
    ours, ref = read_entries("s3://stores/gsm-ds"), read_entries(str(tmp_path / "ref"))
    assert manifest.entries == len(ref["key"]) and manifest.documents == N_DOCS
    assert (ours["value"] == ref["value"]).all()
    np.testing.assert_allclose(ours["key"], ref["key"], atol=2e-3)


def test_killed_build_resumes_to_the_same_output(ray_cluster, corpus, pipeline_output, tmp_path):
    """Kill the job after some units finished; the rerun completes with identical entries and no
    duplicates, and a reader never saw a manifest in between."""
    out = tmp_path / "ds"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen(build_cli(corpus[0], out, "--workers", "1"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    units = out / "units"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(units.glob("*.json")))
    assert 1 <= done < 5 and not (out / "manifest.json").exists()
    res = subprocess.run(build_cli(corpus[0], out, "--workers", "1"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resum" in res.stderr
    ours, ref = read_entries(str(out)), read_entries(str(pipeline_output[0]))
    pairs = list(zip(ours["doc_id"].tolist(), ours["position"].tolist()))
    assert len(pairs) == len(set(pairs)) == len(ref["key"])
    assert (ours["value"] == ref["value"]).all()
    np.testing.assert_allclose(ours["key"], ref["key"], atol=1e-4)


def test_ray_job_submit(ray_cluster, corpus, tmp_path):
    """`ray job submit --working-dir . -- python -m pipelines.build_datastore ...` through the
    job server of the local head node, polled to success."""
    ray_cluster.wait_for_job_agent()
    out = tmp_path / "job-ds"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO), "--",
           "python", *build_cli(corpus[0], out)[1:]]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == N_DOCS and manifest["skipped"] == 3


@pytest.mark.slow                       # two CLI processes (Ray and torch imports)
def test_cli_bad_input_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipelines.build_datastore", "--corpus", f"x={tmp_path}/nope.jsonl",
                          "--output", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "does not exist" in res.stderr
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "precious.txt").write_text("keep me")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    res = subprocess.run([sys.executable, "-m", "pipelines.build_datastore", "--corpus", f"x={tmp_path}/c.jsonl",
                          "--output", str(tmp_path / "notastore")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "not a datastore" in res.stderr
    assert (tmp_path / "notastore" / "precious.txt").read_text() == "keep me"


def test_a_corpus_without_the_fields_asked_for_fails_with_one_line_naming_them(ray_cluster, corpus, tmp_path):
    """Every record lacks the --prompt-field: the job ends in one line (exit 2) that says so, the
    error raised in the Ray task and not its traceback."""
    out = tmp_path / "ds"
    cmd = build_cli(corpus[0], str(out))
    cmd[cmd.index("--prompt-field") + 1] = "instruction"
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the corpus has 0 positions"), res.stderr[-3000:]
    assert f"({N_DOCS + 3} records skipped: missing field 'instruction': {N_DOCS + 2}, invalid JSON: 1)" in last, last
    assert "Traceback" not in res.stderr and "ray::" not in res.stderr and "line " not in last
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("n, split, sample, resumed", [(6, 600, 32, False), (24, 1 << 20, 40, False),
                                                     (24, 1 << 20, 40, True)], ids=["units", "head", "head-resumed"])
def test_self_distillation_stores_the_models_own_answers(ray_cluster, target, tmp_path, n, split, sample, resumed):
    """--self-distill (batched greedy, the default): the stored documents are the prompts plus the
    target's own greedy answers (equal to the in-process engine's), with entries for the answers
    only; their keys come from the answers' own decode steps, with no second forward (the first
    pass's units and the actors' alike), bitwise the keys a forward over the stored documents
    gives. "units": small units, the first pass answers whole ones; "head": one unit larger than
    the sample needs: the first pass answers only its first prompts, and the pool finishes the
    unit from them. "head-resumed": the job dies right after the first pass; the rerun finishes
    from what it left, and stores the head's keys as the first pass kept them (marked here) rather
    than answering those prompts again."""
    import pyarrow.parquet as pq

    from decoding.config import SamplingParams
    from decoding.dense_extract import extract_entries
    from decoding.engine import encode_prompt, generate
    from pipelines.build_datastore import build_datastore
    from pipelines.config import SelfDistillConfig
    from pipelines.distill import head_uri, read_distilled, read_head, write_head
    from pipelines.stages import read_transform

    questions = [r["question"] for r in gsm8k("train")[:n]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions) + "{bad\n")
    cfg = _config(str(path), str(tmp_path / "id"), workers=1, split_bytes=split, sample_rows=sample,
                  self_distill=SelfDistillConfig(max_new_tokens=12, batch_size=4))
    cfg = type(cfg)(**{**cfg.__dict__, "corpora": (CorpusSpec("gsm_id", str(path), "jsonl",
                                                              FieldMap(prompt="question")),)})
    units = plan_units(list(cfg.corpora), cfg.split_bytes)
    assert len(units) >= 3 if n == 6 else len(units) == 1
    if resumed:         # the first pass alone, as _build runs it, then the job is gone
        from index import storage
        from pipelines import build_datastore as job

        assert job._prepare_output(cfg) is None
        storage.write_bytes_atomic(str(tmp_path / "id" / job.BUILD_INFO),
                                   json.dumps({"content_key": cfg.content_key()}).encode())
        job._fit(cfg, units, {"gsm_id": cfg.corpora[0].fields}, 0.0)
        assert not (tmp_path / "id" / "manifest.json").exists()
        # Mark the head's keys: the rerun must store these, not answer those prompts again.
        head, head_keys = read_head(str(tmp_path / "id"), units[0])
        assert 0 < len(head) < n
        write_head(str(tmp_path / "id"), units[0], head, [[np.full_like(k, 7.0) for k in ks] for ks in head_keys],
                   cfg.dim)
        marked = {d.doc_id for d in head}
    manifest = build_datastore(cfg)
    out = tmp_path / "id"
    tables = [pq.read_table(out / s["path"]) for s in manifest.token_shards]
    tokens = [t for table in tables for t in table.column("tokens").to_pylist()]
    starts = [s for table in tables for s in table.column("store_from").to_pylist()]
    assert len(tokens) == n and manifest.skipped_reasons == {"invalid JSON": 1}
    progress = [json.loads(p.read_text()) for p in (out / "distilled").glob("*.progress.json")]
    # What the progress lines read: every prompt answered.
    assert sum(p["done"] for p in progress) == sum(p["total"] for p in progress) == n
    assert Path(head_uri(str(out), units[0])).exists() == (n == 24)
    stored = set(zip(map(tuple, tokens), starts))
    for q in questions:
        prompt = encode_prompt(target, q)
        answer = generate(target, prompt, params=SamplingParams(max_new_tokens=12)).token_ids
        assert (tuple(prompt + answer), len(prompt)) in stored
    assert manifest.entries == sum(len(t) - s for t, s in zip(tokens, starts))
    markers = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    phases = Counter(m["phase"] for m in markers)
    assert phases["distill"] >= 1 and "extract" not in phases, phases
    assert phases["fit"] >= 1 or n == 24
    assert all(m["forward_tokens"] == 0 for m in markers)           # no second forward anywhere
    transform = read_transform(str(out))
    ours = read_entries(str(out))
    keys = {(d, p): k for d, p, k in zip(ours["doc_id"], ours["position"], ours["key"])}
    assert len(keys) == manifest.entries                            # document ids unique across units
    checked = 0
    for u in units:
        docs = read_distilled(str(out), u).documents
        ref = extract_entries(target, transform, docs, [d.doc_id for d in docs], value_len=cfg.value_len,
                              eos=2, max_len=target.context_window, overlap=8)
        for d, p, k in zip(ref.doc_ids, ref.positions, ref.keys):
            assert (keys[(d, p)] == (7.0 if resumed and d in marked else k)).all()
            checked += 1
    assert checked == manifest.entries


def test_corrupt_inputs_are_counted_never_fatal(tmp_path, target):
    """Binary junk, empty files, wrong types and a corrupt Parquet file in one corpus: every bad
    input is counted by reason, the good records still come through."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a-good.jsonl").write_text(json.dumps({"text": "a good record"}) + "\n")
    (d / "b-junk.jsonl").write_bytes(b"\x00\xff\xfe garbage \x80\n" + json.dumps({"text": "survivor"}).encode() + b"\n")
    (d / "c-empty.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"text": [1, 2]}), d / "d-types.parquet")
    (d / "e-corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "f-junk.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (d / "g-list.jsonl").write_text("[1, 2]\n" + json.dumps({"text": ["not", "a", "string"]}) + "\n")
    units = plan_units([CorpusSpec("mixed", str(d))])
    docs, bad = [], Counter()
    for u in units:
        recs = read_unit(u, FieldMap(), target.tokenizer, eos=2)
        docs += recs.documents
        bad += recs.bad
    assert sorted(target.tokenizer.decode(x.tokens) for x in docs) == ["a good record", "survivor"]
    assert bad == Counter({"invalid JSON": 1, "empty file": 1, "field 'text' is not a string": 3,
                           "unreadable Parquet file": 1, "not UTF-8 text": 1, "not a JSON object": 1})


def test_worker_node_killed_mid_build(ray_cluster, corpus, pipeline_output, tmp_path):
    """The node running the extraction actor dies mid-build and a replacement node joins (as an
    autoscaler would bring one): the job finishes with the output of an undisturbed run, and the
    unit the dead node finished stands (its retried task does not redo it).

    Deterministic: the victim's actor stalls after its first unit (the stages' fault hook, set in
    that node's environment only), so the kill lands with one unit done there and the rest to do.
    Both nodes have room for the extraction actor beside the tokenizer actor (2 CPUs)."""
    from pipelines.stages import STALL_AFTER_UNITS_ENV

    out = tmp_path / "ds"
    victim = ray_cluster.add_node(num_cpus=2, resources={"extract": 1}, dashboard_agent_listen_port=free_port(),
                                  env_vars={STALL_AFTER_UNITS_ENV: "1"})
    ray_cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen(build_cli(corpus[0], out, "--workers", "1", "--worker-resources", '{"extract": 1}'),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def markers(phase):
        found = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")] if (out / "units").is_dir() else []
        return [m for m in found if m["phase"] == phase]

    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not markers("extract"):
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        (first,) = markers("extract")
        assert first["node"] == victim.node_id
        time.sleep(1.0)
        assert len(markers("extract")) == 1                     # the victim stalled: the rest is to do
        ray_cluster.remove_node(victim, allow_graceful=False)
        ray_cluster.add_node(num_cpus=2, resources={"extract": 1}, dashboard_agent_listen_port=free_port())
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    done = {m["unit"]: m["node"] for m in markers("extract")}
    assert done[first["unit"]] == victim.node_id                # the dead node's unit was not redone
    assert len(set(done.values())) == 2                         # and the rest ran on the replacement
    ours, ref = read_entries(str(out)), read_entries(str(pipeline_output[0]))
    pairs = list(zip(ours["doc_id"].tolist(), ours["position"].tolist()))
    assert len(pairs) == len(set(pairs)) == len(ref["key"])
    assert (ours["value"] == ref["value"]).all()
    np.testing.assert_allclose(ours["key"], ref["key"], atol=1e-4)


def test_a_retried_extraction_task_keeps_the_finished_unit(pipeline_output, corpus, tmp_path):
    """Ray retries a task whose node died after its unit was written (and re-runs one whose output
    object was lost with the node): the actor returns the finished unit's summary and rewrites
    nothing. Without its done marker, the same call extracts the unit again, to the same entries."""
    import shutil

    import pyarrow.parquet as pq

    from pipelines.stages import ExtractUnits, TokenizeUnits, read_transform, unit_to_row

    out = tmp_path / "ds"
    shutil.copytree(pipeline_output[0], out)
    cfg = _config(str(corpus[0]), str(out))
    marker = lambda u: out / "units" / f"{u.name}.json"                          # noqa: E731
    unit = next(u for u in plan_units(list(cfg.corpora), cfg.split_bytes)
                if marker(u).exists() and json.loads(marker(u).read_text())["phase"] == "extract")
    info = json.loads((out / "build.json").read_text())
    batch = {k: np.array([v], dtype=object) for k, v in unit_to_row(unit, cfg.corpora[0].fields).items()}
    batch = TokenizeUnits(model=None, eos=info["eos"])(batch)
    actor = ExtractUnits(model=None, dtype="float32", layer=-1, gpu=False, threads=1, output=str(out),
                         transform=read_transform(str(out)), value_len=cfg.value_len, eos=info["eos"], max_len=info["max_len"],
                         overlap=info["overlap"], batch_tokens=cfg.batch_tokens)
    files = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}   # noqa: E731
    before, summary = files(), json.loads(marker(unit).read_text())
    assert [json.loads(r) for r in actor(batch)["summary"]] == [summary]
    assert files() == before                                                   # nothing rewritten
    shard = lambda: pq.read_table(out / summary["shard"]["path"]).to_pydict()   # noqa: E731
    first = shard()
    marker(unit).unlink()
    redone = json.loads(actor(batch)["summary"][0])
    assert json.loads(marker(unit).read_text()) == redone and redone["entries"] == summary["entries"]
    again = shard()
    assert again["value"] == first["value"] and again["position"] == first["position"]
    np.testing.assert_allclose(np.array(again["key"]), np.array(first["key"]), atol=1e-4)


def test_a_model_workers_start_reads_no_storage(pipeline_output, monkeypatch):
    """The model workers (extraction, self-distillation) get the key transform from the driver: a
    storage outage while Ray starts one cannot kill the actor's creation (which Ray reports as the
    actor's death with the StorageError object lost: a traceback, exit 1, seen in CI); it fails
    the worker's next task instead, whose StorageError the job reports in one line."""
    from index import storage
    from pipelines.distill import DistillUnits
    from pipelines.stages import ExtractUnits, read_transform

    transform = read_transform(str(pipeline_output[0]))
    info = json.loads((pipeline_output[0] / "build.json").read_text())

    def down(*args, **kwargs):
        raise storage.StorageError("s3://outage/ds: could not read (the server is down)")

    for name in ("read_bytes", "exists", "list_dir", "write_bytes_atomic"):
        if hasattr(storage, name):
            monkeypatch.setattr(storage, name, down)
    common = dict(model=None, dtype="float32", gpu=False, threads=1, output="s3://outage/ds", transform=transform,
                  eos=info["eos"])
    ExtractUnits(**common, layer=-1, value_len=8, max_len=info["max_len"], overlap=info["overlap"], batch_tokens=512)
    DistillUnits(**common, max_new_tokens=8, method="ar", entries={})


def test_a_storage_error_in_a_worker_is_found_behind_rays_wrappers(ray_cluster):
    """Ray Data hands a stage's error to the driver as a UserCodeException without its cause, and
    an actor whose start failed as an ActorDiedError holding the traceback as text: the job still
    finds the StorageError (its one line) and ends with it, not with a traceback (seen in CI: an
    outage while Ray started a model worker)."""
    import ray

    from index.storage import StorageError
    from pipelines.build_datastore import _storage_failure

    class Fails:
        def __call__(self, batch):
            raise StorageError("s3://outage/ds/units/u.json: could not read (EndpointConnectionError: down)")

    class FailsToStart:
        def __init__(self):
            raise StorageError("s3://outage/ds/transform.npz: could not read (EndpointConnectionError: down)")

        def __call__(self, batch):
            return batch

    for udf, key in ((Fails, "units/u.json"), (FailsToStart, "transform.npz")):
        ds = ray.data.from_items([{"a": 1}]).map_batches(udf, batch_size=1,
                                                         compute=ray.data.ActorPoolStrategy(size=1))
        with pytest.raises(Exception) as err:
            list(ds.iter_rows())
        found = _storage_failure(err.value)
        assert isinstance(found, StorageError), type(err.value)
        assert str(found) == f"s3://outage/ds/{key}: could not read (EndpointConnectionError: down)"
    assert _storage_failure(RuntimeError("no storage here")) is None


def test_s3_outage_fails_cleanly_and_the_rerun_completes(ray_cluster, s3_server, corpus, tmp_path):
    """The S3 server goes down mid-build for longer than the retries: the job ends with one clear
    line (exit 2) and publishes no manifest; once the server is back, the same command completes.
    (moto keeps no state across a restart, so the rerun rebuilds what was lost.)"""
    from index import storage

    s3_server.make_bucket("outage")
    out = "s3://outage/ds"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    proc = subprocess.Popen(build_cli(corpus[0], out, "--workers", "1"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="outage").get("Contents", [])]
            if any(k.startswith("ds/units/") for k in keys):
                break
            time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        s3_server.stop()
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        if s3_server.proc is None:
            s3_server.start()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rerun the same command to resume" in last and "Traceback" not in err
    s3_server.make_bucket("outage")
    assert not storage.exists(out + "/manifest.json")
    res = subprocess.run(build_cli(corpus[0], out, "--workers", "1"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads(storage.read_bytes(out + "/manifest.json"))
    assert manifest["documents"] == N_DOCS and manifest["skipped"] == 3


def test_index_artifact_from_the_pipeline_output(ray_cluster, pipeline_output, tmp_path):
    """The index build consumes the pipeline's datastore on the multi-node cluster: sharded and
    merged, its searches, values and REST index agree with the datastore itself."""
    from index.artifact import load_artifact
    from index.artifact_build import BuildConfig
    from pipelines.build_index import build_artifact
    from index.dense_store import DenseStore

    out, manifest = pipeline_output
    store = DenseStore.load(out)
    result = build_artifact(BuildConfig(datastore=str(out), output=str(tmp_path / "index"), shards=2, merge=False),
                            progress=None)
    art = load_artifact(tmp_path / "index")
    assert len(art) == manifest.entries and len(art.shards) == 2 and result.manifest.entries == manifest.entries
    q = store.keys[::7][:64]
    sims_a, ids_a = art.search(q, 10)
    sims_s, ids_s = store.search(q, 10)
    np.testing.assert_allclose(sims_a, sims_s, atol=1e-5)
    assert (np.asarray(art.values)[ids_a[:, 0]] == store.values[ids_s[:, 0]]).all()
    assert art.sparse is not None


def test_a_pool_the_cluster_cannot_place_fails_with_one_line(ray_cluster, corpus, tmp_path):
    """Three extraction workers that each need the per-node 'slot' resource, on a two-node cluster:
    the first pass (one slot) runs, the pool never fully starts, and the job ends after the start
    timeout with one clear line (exit 2), the units of the first pass kept, no manifest."""
    out = tmp_path / "ds"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    res = subprocess.run(build_cli(corpus[0], str(out), "--workers", "3", "--worker-resources", '{"slot": 1}',
                              "--worker-start-timeout", "8"),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "did not all start within 8 s" in last, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (out / "manifest.json").exists() and list((out / "units").glob("*.json"))


def test_distillation_progress_lines_while_a_unit_runs(tmp_path, capsys):
    """A unit of many prompts takes minutes: the driver prints how far it is meanwhile, from the
    progress file the worker writes, and then the finished unit."""
    import threading
    import time

    from pipelines.build_datastore import _consume_with_progress
    from pipelines.stages import ProgressFile, distill_progress_uri
    from index.records import Unit

    unit = Unit("c", str(tmp_path / "in.jsonl"), "jsonl", 0, 1, 0)
    release = threading.Event()

    class Rows:                       # stands in for the Ray dataset: one unit, answered in batches
        def iter_rows(self):
            p = ProgressFile(distill_progress_uri(str(tmp_path), unit.name), 10, every_s=0)
            p.add(4)
            release.wait(5)
            p.add(6)
            yield {"summary": json.dumps({"unit": unit.name, "documents": 10})}

    threading.Timer(0.5, release.set).start()
    t0 = time.monotonic()
    _consume_with_progress(Rows(), str(tmp_path), [unit], every_s=0.2)
    err = capsys.readouterr().err
    assert f"{unit.name} 4/10" in err and "distilled 1/1 units (10 answers" in err and time.monotonic() - t0 < 5
