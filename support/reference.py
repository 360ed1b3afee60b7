"""The reference answer of a served request: the same request decoded alone by the engine in
this process, as the app would decode it."""

from __future__ import annotations

import json

import torch

from decoding.engine import generate
from decoding.methods import NEEDS_DENSE, NEEDS_SPARSE, make_drafter
from decoding.target import TargetModel
from serving import protocol
from serving.config import ServingConfig
from serving.decoder import Decoder, _resolve_device
from serving.index_data import load_version_stores


def engine_reference(bodies: list[dict], app: dict) -> list[list[int]]:
    """Each chat body decoded alone by the engine in this process, as the app `app` (its args)
    would decode it: the request parsed by the server's protocol, the prompt encoded by the
    decoder's own code, the app's model, dtype and torch threads, its index version loaded whole.
    Greedy and strictly verified, a served answer must equal this token for token whatever was
    drafted, sharded or run beside it, with whatever budget (a fixed one or the adaptive one:
    what the budget changes is the drafts, never a strict answer)."""
    cfg = ServingConfig.from_args(app)
    threads = torch.get_num_threads()
    if cfg.model.torch_threads:
        torch.set_num_threads(cfg.model.torch_threads)
    try:
        device, dtype = _resolve_device(cfg.model)
        target = TargetModel.load(cfg.model.path, dtype=dtype, device=device)
        decoder = type("Alone", (), {"model": target, "target": target})()     # what _encode uses
        stores = None
        refs = []
        for body in bodies:
            req = protocol.chat_request(protocol.parse(protocol.ChatRequest, json.dumps(
                {**body, "stream": False}).encode()), cfg)
            if req.soft is not None:
                raise ValueError("the reference is for strictly verified requests (a soft answer depends on its drafts)")
            if stores is None and (req.method in NEEDS_SPARSE or req.method in NEEDS_DENSE):
                stores = load_version_stores(cfg.index, target)      # the whole index, as one decoder holds it
            ids = Decoder.func_or_class._encode(decoder, req)
            r = generate(target, ids, params=req.params, drafter=make_drafter(req.method, stores), budget=req.budget,
                         soft=req.soft)
            refs.append(list(r.token_ids))
    finally:
        torch.set_num_threads(threads)
    return refs
