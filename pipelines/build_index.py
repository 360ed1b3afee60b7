"""Build the serving index artifact from a dense datastore, on Ray.

    python -m pipelines.build_index --datastore DIR_OR_S3 --output DIR_OR_S3 [--shards N]
        [--factory auto|Flat|IVF4096,Flat|IVF65536,SQ8|OPQ32_64,IVF65536,PQ32] [--nprobe N] [--merge/--no-merge]
        [--sparse/--no-sparse] [--sparse-shards N] [--ray-address ADDR]

Runs locally (joins the cluster at --ray-address or $RAY_ADDRESS, else starts a local Ray) or as
a job: ``ray job submit --working-dir . -- python -m pipelines.build_index ...``. Progress lines
go to stderr, a summary to stdout; bad input prints one line on stderr and exits with status 2.
See ``index.artifact`` for the artifact layout and the loader API.
"""

from __future__ import annotations

import argparse
import os
import sys

from index.artifact_build import BuildConfig, build_artifact, check_build
from index.dense_format import DatastoreError
from index.storage import StorageError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.build_index", description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore", required=True, help="dense datastore directory or s3:// URI")
    p.add_argument("--output", required=True, help="artifact root (local directory or s3:// URI); "
                   "the build is published as the next version <output>/vNNNN and made CURRENT")
    p.add_argument("--shards", type=int, default=0, help="index shards built in parallel (default: one per "
                   "cluster CPU, at most one per 25,000 entries)")
    p.add_argument("--factory", default="auto", help="FAISS factory: auto (Flat up to 50,000 entries, "
                   "IVF<4*sqrt(E)>,Flat up to 50M, IVF<4*sqrt(E)>,SQ8 above), Flat, or an IVF string "
                   "(e.g. IVF4096,PQ32 or OPQ32_64,IVF4096,PQ32)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: the smallest "
                   "reaching --target-recall against exact search)")
    p.add_argument("--target-recall", type=float, default=0.96, help="recall@10 the nprobe calibration aims at")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the shards into one index (--no-merge: keep them for fan-out serving)")
    p.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="also build the REST suffix index from the same token streams")
    p.add_argument("--sparse-shards", type=int, default=1)
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the GPU (default: when FAISS sees one)")
    p.add_argument("--no-current", action="store_true", help="publish the version without making it CURRENT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = BuildConfig(datastore=args.datastore, output=args.output, shards=args.shards, factory=args.factory,
                         nprobe=args.nprobe, target_recall=args.target_recall, merge=args.merge, sparse=args.sparse,
                         sparse_shards=args.sparse_shards, use_gpu=args.gpu, make_current=not args.no_current,
                         seed=args.seed)
    try:
        check_build(config)                              # fail fast, before starting Ray
        import ray

        if not ray.is_initialized():
            # Never join a cluster by accident (ray.init() alone picks up any cluster on the machine).
            ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "local", logging_level="ERROR")
        result = build_artifact(config)
    except (DatastoreError, StorageError, ValueError, ConnectionError) as exc:
        print(f"build_index: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build_index: interrupted", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
