"""One loader for models (decoding.model_loader) and one for datastores (decoding.stores), used by
the CLI, the pipelines and serving: a .gguf file loads like the embedded default (converted once
into the cache), and `sense generate --index` decodes from what pipelines.build_index publishes."""

from __future__ import annotations

import json
import shutil

import pytest

from decoding import model_loader
from decoding.errors import ModelLoadError

PROMPT = "What is the capital of France?"


def _snapshot(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.model
def test_a_gguf_file_loads_like_the_embedded_default(tmp_path, monkeypatch):
    """A copy of the embedded GGUF under another name, loaded by path: converted once into the
    cache (atomically: no temporary directory left), the same weights and logits as the embedded
    default; a second load reuses the checkpoint (no conversion, the cache untouched)."""
    import torch

    ref_model, ref_tok = model_loader.load_model_and_tokenizer(None)          # the embedded default
    copy = tmp_path / "my-smollm2.gguf"
    shutil.copyfile(model_loader.embedded_gguf_path(), copy)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SENSE_CACHE_DIR", str(cache))
    conversions = []
    convert = model_loader._convert_gguf
    monkeypatch.setattr(model_loader, "_convert_gguf", lambda *a: (conversions.append(a), convert(*a)))

    model, tok = model_loader.load_model_and_tokenizer(str(copy))
    assert len(conversions) == 1
    ckpt = model_loader.gguf_cache_dir(copy)
    assert ckpt.parent == cache / "models" and ckpt.name.startswith("my-smollm2-")
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.is_dir()) == [ckpt.name]     # no temp dir left
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
    ids = ref_tok(PROMPT, return_tensors="pt")["input_ids"]
    assert tok(PROMPT, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=1e-5)

    before = _snapshot(cache)
    again, _ = model_loader.load_model_and_tokenizer(copy)                       # a PathLike works too
    assert len(conversions) == 1 and _snapshot(cache) == before
    assert model_loader.resolve_model_path(str(copy)) == str(ckpt)
    assert next(again.parameters()).dtype == torch.float32


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg.strip() and "Traceback" not in msg
    return msg


def test_bad_model_paths_are_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    plain_dir = tmp_path / "downloads"                  # a directory, but no model's
    plain_dir.mkdir()
    gguf_dir = tmp_path / "gguf-dir"                    # a directory holding one GGUF file
    gguf_dir.mkdir()
    (gguf_dir / "model.Q8_0.gguf").write_bytes(b"GGUF")
    cases = [(tmp_path / "missing.gguf", "does not exist"), (text, "is not a GGUF file"),
             (weights, "is not a GGUF file"), (tmp_path / "nowhere" / "model-dir", "does not exist"),
             (truncated, "could not convert the GGUF model"), (plain_dir, "has no config.json"),
             (gguf_dir, "it holds model.Q8_0.gguf: pass that file")]
    for path, needle in cases:
        with pytest.raises(ModelLoadError) as err:
            model_loader.resolve_model_path(str(path))
        assert needle in _one_line(err.value) and str(path) in str(err.value), err.value
    assert not list((tmp_path / "cache").rglob("config.json"))                  # nothing half-converted

    from decoding.cli import main

    assert main(["generate", "--model", str(text), "--dtype", "float32", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sense: error: ") and "is not a GGUF file" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# datastores: the published artifact


@pytest.fixture(scope="module")
def artifact(ray_cluster, dense_store_dir, tmp_path_factory):
    """What pipelines.build_index publishes from the small real datastore (v0001, CURRENT)."""
    from pipelines.build_index import main as build_index

    root = tmp_path_factory.mktemp("loaders") / "index"
    assert build_index(["--datastore", str(dense_store_dir), "--output", str(root), "--shards", "2"]) == 0
    assert (root / "CURRENT").read_text().strip() == "v0001"
    return root


def _generate(capsys, *args):
    from decoding.cli import main

    rc = main(["generate", "--json", "--max-new-tokens", "24", *args, PROMPT])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_cli_generate_from_the_published_artifact(artifact, target, monkeypatch, capsys):
    """`sense generate --index <root>` decodes with the artifact's stores (strict:
    the same text as plain decoding); --version pins one; the artifact's sparse/ folder (or the
    artifact itself) also serves as --sparse-store; a folder that is neither is one clear line."""
    from decoding.stores import load_datastores
    from decoding.target import TargetModel
    from index.artifact import IndexArtifact

    monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, *a, **k: target))  # one model load
    rc, out, err = _generate(capsys, "--method", "ar")
    assert rc == 0, err
    plain = json.loads(out)["text"]
    for args in (["--index", str(artifact)], ["--index", str(artifact), "--version", "v0001"],
                 ["--index", str(artifact), "--version", "CURRENT"], ["--index", str(artifact / "v0001")]):
        rc, out, err = _generate(capsys, "--method", "sense", *args)
        assert rc == 0, (args, err)
        assert json.loads(out)["text"] == plain
    for sparse in (artifact / "v0001" / "sparse", artifact, artifact / "v0001" / "sparse" / "shard-00000"):
        rc, out, err = _generate(capsys, "--method", "rest", "--sparse-store", str(sparse))
        assert rc == 0, (sparse, err)
        assert json.loads(out)["text"] == plain

    # the one loader returns the artifact's objects
    stores = load_datastores(target, index=str(artifact))
    assert isinstance(stores.dense, IndexArtifact) and stores.dense.uri.endswith("v0001")
    folder = load_datastores(target, sparse=str(artifact / "v0001" / "sparse"), dense=None).sparse
    assert folder.n_tokens == stores.sparse.n_tokens > 0

    # errors: one line, exit status 2
    (artifact.parent / "empty").mkdir(exist_ok=True)
    for args, needle in [(["--method", "rest", "--sparse-store", str(artifact.parent / "empty")], "neither"),
                         (["--method", "rest", "--sparse-store", str(artifact.parent / "nowhere")], "nowhere"),
                         (["--method", "sense", "--index", str(artifact), "--version", "v0009"], "v0009"),
                         (["--method", "sense", "--index", str(artifact), "--version", "latest"], "latest"),
                         (["--method", "dense", "--index", str(artifact.parent / "empty")], "not an index artifact")]:
        rc, out, err = _generate(capsys, *args)
        errors = [line for line in err.splitlines() if line.startswith("sense: error: ")]   # after "model: ..."
        assert rc == 2 and len(errors) == 1 and needle in errors[0], (args, err)
        assert err.endswith(errors[0]) and "Traceback" not in err
