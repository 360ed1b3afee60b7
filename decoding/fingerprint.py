"""The fingerprint of a target model: what a dense datastore's keys depend on (its weights, its
tokenizer, the hidden layer). The record and the compatibility check are ``index.dense_format``'s."""

from __future__ import annotations

import hashlib
import json

import torch

from index.dense_format import ModelFingerprint


def model_fingerprint(target, layer: int | None = None) -> ModelFingerprint:
    """Hash the target's weights and tokenizer (cached on the target object).

    The weights are hashed as bfloat16 (each tensor rounded to bfloat16, then hashed), so the
    same checkpoint has the same fingerprint whether it was loaded in float32 or bfloat16: a
    datastore built in one loads in the other (the manifest records the dtype its keys were
    computed in). A float16 load rounds differently and is a different fingerprint."""
    cached = getattr(target, "_sense_fingerprint", None)
    if cached is None:
        h = hashlib.sha256()
        for name, tensor in sorted(target.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())
        tok = target.tokenizer
        th = hashlib.sha256()
        backend = getattr(tok, "backend_tokenizer", None)
        th.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tok.get_vocab().items())).encode())
        cached = (str(getattr(target.config, "_name_or_path", "")), h.hexdigest()[:16], th.hexdigest()[:16])
        target._sense_fingerprint = cached
    model_id, wh, th = cached
    return ModelFingerprint(model_id=model_id, weights_hash=wh, tokenizer_hash=th,
                            layer=target.hidden_layer if layer is None else layer)
