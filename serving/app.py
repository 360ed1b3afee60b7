"""The Serve application builder: ``import_path: serving.app:build_app`` with ``args:``.

    serve run serving.app:build_app                      # embedded default, one machine
    serve run serving.app:build_app shards.num_shards=2  # (serve run passes key=value args)
    serve deploy config.yaml                             # args from a Serve config file

Graph: Ingress (FastAPI) -> Decoder (target model, decode loop) -> IndexShard0..N-1 (FAISS),
or no shards when ``shards.num_shards`` is 0 (the index is held in the decoder). The ``index``
section becomes the decoder's and shards' ``user_config``: to swap in a new index version
without restarting anything, change ``user_config`` of the deployments ``Decoder`` and
``IndexShard<j>`` in the Serve config (``{"index": {...}}``), keeping ``args`` unchanged
(changed args are a new application version: Serve replaces the replicas, still draining
requests in flight).
"""

from __future__ import annotations

from ray import serve

from serving.config import DECODER_NAME, INGRESS_NAME, SHARD_NAME, ServingConfig, nest_dotted


def _replicas(section) -> dict:
    if section.autoscaling_config is not None:
        return {"autoscaling_config": section.autoscaling_config}
    return {"num_replicas": section.num_replicas}


def build_app(args: dict | None = None) -> serve.Application:
    """Validate `args` (see serving/config.py) and bind the deployment graph."""
    from serving.decoder import Decoder
    from serving.ingress import Ingress
    from serving.shard import IndexShard

    args = dict(args or {})
    if any("." in k for k in args):
        args = nest_dotted(args)
    cfg = ServingConfig.from_args(args)
    static = cfg.static()
    index_config = cfg.index.user_config()

    sh = cfg.shards
    shards = [IndexShard.options(name=SHARD_NAME.format(j), user_config=index_config,
                                 max_ongoing_requests=sh.max_ongoing_requests,
                                 ray_actor_options=sh.ray_actor_options, **_replicas(sh))
              .bind(static, j, sh.num_shards) for j in range(sh.num_shards)]
    dc = cfg.decoder
    decoder = Decoder.options(name=DECODER_NAME, user_config=index_config,
                              max_ongoing_requests=dc.replica_capacity,
                              max_queued_requests=dc.max_queued_requests,
                              ray_actor_options=dc.ray_actor_options,
                              graceful_shutdown_timeout_s=dc.graceful_shutdown_timeout_s,
                              **_replicas(dc)).bind(static, shards or None)
    ing = cfg.ingress
    return Ingress.options(name=INGRESS_NAME, num_replicas=ing.num_replicas,
                           max_ongoing_requests=ing.max_ongoing_requests,
                           max_queued_requests=ing.max_queued_requests,
                           backpressure_config={"status_code": ing.overload_status,
                                                "retry_after_s": ing.retry_after_s},
                           ray_actor_options=ing.ray_actor_options).bind(static, decoder)


def reset_prefix_caches(app_name: str) -> None:
    """Empty the prefix cache of app `app_name`'s decoder (decoding/prefix_cache.py), from a
    process connected to its Ray: a handle call reaches one replica, so this is for apps of one
    decoder replica. Timings that ask the same prompt twice (the main job, the benchmarks) empty
    it first: a user's new question finds the chat template kept, not the whole prompt."""
    serve.get_deployment_handle(DECODER_NAME, app_name=app_name).reset_prefix_cache.remote().result()


def stop_handle_polls() -> None:
    """Stop the long polls of this process's Serve handles; for a driver that made handle calls
    (``reset_prefix_caches``), before ``ray.shutdown()``. A poll that the controller answers while
    Ray shuts down polls again, into a Ray that is gone: Serve's event loop then prints a traceback
    (Ray's auto-init, ``'NoneType' object has no attribute 'address_info'``): it ended the main
    job's run in a fresh clone's suite once (session 42). Serve has no public call for it: each
    client stops once its pending poll returns (``LongPollClient.stop``)."""
    import gc

    from ray.serve._private.long_poll import LongPollClient

    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads `__class__`, which some objects compute
        # (torch.distributed's deprecated `reduce_op` warns when it is read)
        if issubclass(type(obj), LongPollClient):
            obj.stop()
