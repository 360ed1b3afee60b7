"""A model's fingerprint is remembered on disk for a model loaded from a local directory, and
hashed again whenever what it names may have changed (a file of the directory, a weight changed
after the load); it is the hash that hashing the weights gives."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from decoding import fingerprint
from decoding.fingerprint import model_fingerprint
from decoding.model_loader import load_model_and_tokenizer
from decoding.target import TargetModel
from tests.conftest import tiny_llama


@pytest.fixture
def model_dir(tmp_path, target, monkeypatch):
    monkeypatch.setenv("SENSE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny"
    tiny_llama(vocab=target.tokenizer.vocab_size + 3).save_pretrained(path)
    target.tokenizer.save_pretrained(path)
    return path


def _counted(monkeypatch) -> list:
    calls = []
    real = fingerprint._hashes

    def hashes(t):
        calls.append(1)
        return real(t)

    monkeypatch.setattr(fingerprint, "_hashes", hashes)
    return calls


def _load(path, dtype="float32") -> TargetModel:
    model, tokenizer = load_model_and_tokenizer(str(path), dtype=dtype)
    return TargetModel(model, tokenizer, invariant_forward=False)


def test_a_local_models_fingerprint_is_remembered_until_its_files_or_weights_change(model_dir, monkeypatch):
    calls = _counted(monkeypatch)
    first = model_fingerprint(_load(model_dir))
    assert len(calls) == 1
    again = _load(model_dir)
    assert model_fingerprint(again) == first and len(calls) == 1             # from the disk
    assert model_fingerprint(_load(model_dir, "bfloat16")) == first and len(calls) == 1

    changed = _load(model_dir)
    with torch.no_grad():
        changed.model.lm_head.weight.mul_(2)                # after the load (an adapter merged)
    assert model_fingerprint(changed).weights_hash != first.weights_hash and len(calls) == 2

    config = model_dir / "config.json"                      # the checkpoint rewritten in place
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_fingerprint(_load(model_dir)) == first and len(calls) == 3

    other_tok = copy.deepcopy(again.tokenizer)             # the model beside another tokenizer
    other_tok.add_tokens(["<an added token>"])
    paired = TargetModel(_load(model_dir).model, other_tok, invariant_forward=False)
    assert model_fingerprint(paired).tokenizer_hash != first.tokenizer_hash and len(calls) == 4

    in_memory = TargetModel(tiny_llama(vocab=32), again.tokenizer, invariant_forward=False)
    model_fingerprint(in_memory)
    del in_memory._sense_fingerprint
    model_fingerprint(in_memory)
    assert len(calls) == 6                                  # no directory: hashed every time


def test_the_remembered_fingerprint_is_the_computed_one(model_dir, monkeypatch):
    target = _load(model_dir)
    computed = fingerprint._hashes(target)
    model_fingerprint(target)
    fresh = _load(model_dir)
    monkeypatch.setattr(fingerprint, "_hashes", lambda t: pytest.fail("hashed again"))
    fp = model_fingerprint(fresh)
    assert (fp.weights_hash, fp.tokenizer_hash) == computed


def test_an_unreadable_entry_is_hashed_again_and_an_unwritable_cache_costs_only_the_hashing(model_dir, monkeypatch,
                                                                                              tmp_path):
    first = model_fingerprint(_load(model_dir))
    entries = list((tmp_path / "cache" / "fingerprints").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text("{not json")
    calls = _counted(monkeypatch)
    assert model_fingerprint(_load(model_dir)) == first and len(calls) == 1
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would be")
    monkeypatch.setenv("SENSE_CACHE_DIR", str(blocked))
    assert model_fingerprint(_load(model_dir)) == first and len(calls) == 2
