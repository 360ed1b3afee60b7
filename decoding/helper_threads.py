"""One thread for the helper libraries that a decode loop calls between its forwards.

A dense drafter's step is a FAISS search for one query and a small numpy matmul (the key
transform). Both libraries bring their own thread pools (FAISS its own libgomp, numpy and FAISS
their own OpenBLAS), separate from torch's. After each call their idle threads spin for a while
on the cores torch's threads need for the next forward: on a 2-core machine that made every
forward of a SENSE request 15-30% slower than the same forward of a plain one (measured: 8
prefills, and 8 requests decoded in one batch). One query gains nothing from more threads, so a
process that decodes with a dense drafter runs them on one. Index builds are not decode loops and
keep every core (they run in their own processes and never build a drafter).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_done = False


def single_threaded_helpers() -> None:
    """FAISS's OpenMP pool and every OpenBLAS in the process (numpy's, FAISS's) to one thread;
    torch's own pools (OpenMP, MKL, oneDNN) untouched. Once per process."""
    global _done
    with _lock:
        if _done:
            return
        import faiss
        from threadpoolctl import ThreadpoolController

        faiss.omp_set_num_threads(1)
        ThreadpoolController().select(internal_api="openblas").limit(limits=1)
        _done = True
