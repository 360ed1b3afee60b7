"""The fingerprint of a target model: what a dense datastore's keys depend on (its weights, its
tokenizer, the hidden layer). The record and the compatibility check are ``index.dense_format``'s."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from index.cache import cache_root
from index.dense_format import ModelFingerprint

SAMPLE_BYTES = 4096         # of each tensor's start and end, in the check that a cached hash still holds


def model_fingerprint(target, layer: int | None = None) -> ModelFingerprint:
    """Hash the target's weights and tokenizer (cached on the target object, and on disk for a
    model loaded from a local directory: :func:`_remembered_hashes`).

    The weights are hashed as bfloat16 (each tensor rounded to bfloat16, then hashed), so the
    same checkpoint has the same fingerprint whether it was loaded in float32 or bfloat16: a
    datastore built in one loads in the other (the manifest records the dtype its keys were
    computed in). A float16 load rounds differently and is a different fingerprint."""
    cached = getattr(target, "_sense_fingerprint", None)
    if cached is None:
        name = str(getattr(target.config, "_name_or_path", ""))
        cached = (name, *_remembered_hashes(target))
        target._sense_fingerprint = cached
    model_id, wh, th = cached
    return ModelFingerprint(model_id=model_id, weights_hash=wh, tokenizer_hash=th,
                            layer=target.hidden_layer if layer is None else layer)


def _hashes(target) -> tuple[str, str]:
    """(weights hash, tokenizer hash), computed: every weight's bytes as bfloat16 (0.27 s for the
    135M-parameter default model, some 15 s for a 7B one)."""
    h = hashlib.sha256()
    for name, tensor in sorted(target.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())
    tok = target.tokenizer
    th = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    th.update(backend.to_str().encode() if backend is not None else
              json.dumps(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16], th.hexdigest()[:16]


def _remembered_hashes(target) -> tuple[str, str]:
    """:func:`_hashes`, kept under ``$SENSE_CACHE_DIR/fingerprints`` for a model loaded from a
    local directory (``decoding.model_loader`` marks it): named by the directory's files (names,
    sizes, modification times), whether the load is float16 (which rounds otherwise), the
    tokenizer's name and size, and the first and last bytes of every live weight, so a
    checkpoint rewritten in place or weights changed after the load (a merged adapter) are
    hashed again. Any other model is hashed every time."""
    source = getattr(target.model, "_sense_weights_dir", None)
    if not source or not Path(source).is_dir():
        return _hashes(target)
    try:
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(source)
                       if e.is_file() and not e.name.startswith("."))
    except OSError:
        return _hashes(target)
    float16 = any(t.dtype == torch.float16 for t in target.model.parameters())   # rounds otherwise
    tok = target.tokenizer                  # the directory's own, as a load pairs them
    tok_id = [str(getattr(tok, "name_or_path", "")), len(tok) if hasattr(tok, "__len__") else None]
    key = hashlib.sha256(json.dumps([str(Path(source).resolve()), files, float16, tok_id]).encode())
    for name, tensor in sorted(target.model.state_dict().items()):
        flat, n = tensor.detach().reshape(-1), SAMPLE_BYTES // 2
        key.update(name.encode())
        for part in (flat[:n], flat[-n:]):
            key.update(part.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())
    path = cache_root() / "fingerprints" / f"{key.hexdigest()[:32]}.json"
    try:
        stored = json.loads(path.read_text())
        return stored["weights_hash"], stored["tokenizer_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    wh, th = _hashes(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"weights_hash": wh, "tokenizer_hash": th, "source": str(source)}))
        os.replace(tmp, path)
    except OSError:             # an unwritable cache costs the hashing, nothing else
        pass
    return wh, th
