"""Support code shared by the tests and the benchmarks: local servers and clusters, HTTP load,
fault injection. One module per job:

- ``net``: free ports, polling until a condition holds;
- ``s3``: a real S3-compatible server (moto) on loopback;
- ``cluster``: a local multi-node Ray cluster (a head and one worker node);
- ``processes``: the Serve processes of an app and their resident memory;
- ``module_run``: a module run as its own process, reporting which heavy libraries it imported;
- ``load``: chat request bodies, the load generator (bursts at a fixed rate) and its verdicts;
- ``faults``: fault injectors (decoder replica and index shards killed mid-request);
- ``reference``: a request decoded alone by the engine in process, as a served app would;
- ``datastore``: the datastore pipeline's small test build (its CLI, corpus, entries).

Layering: support sits above ``decoding``, ``index``, ``pipelines`` and ``serving`` and below
``bench`` and ``tests``; it imports neither of those two.
"""
