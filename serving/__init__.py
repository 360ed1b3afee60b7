"""SENSE on Ray Serve: an OpenAI-compatible HTTP API over the speculative decoding engine.

Modules, one job each:
- ``config``: the typed application args (one place for every knob);
- ``app``: ``build_app(args)``, the Serve application builder (``serving.app:build_app``);
- ``ingress``: the FastAPI routes; ``protocol``: request validation; ``responses``: bodies and
  SSE chunks; ``errors``: OpenAI-style errors; ``auth``: optional API keys (bearer tokens);
- ``decoder``: the decoder deployment (target model, decode loop per request);
- ``shard``: the index-shard deployment (batched FAISS search); ``index_data``: loading
  datastores whole or as one shard's part; ``remote_index``: the decoder's fan-out over the
  shards; ``drafting``: the PLD fallback when shards are unavailable;
- ``text``: incremental detokenisation for streaming; ``metrics``: Prometheus metrics;
- ``run``: ``python -m serving.run``, a local server in one command.
"""
