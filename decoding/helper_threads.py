"""One thread for the BLAS libraries that a decode loop calls between its forwards.

A dense drafter's step is a FAISS search for one query and a small numpy matmul (the key
transform). numpy and FAISS each bring an OpenBLAS with a thread pool of its own, separate from
torch's; after a call its idle threads spin for a while on the cores torch's threads need for the
next forward (8 SENSE requests started in 8.0 s against 7.0 s for plain ones; 5.5 s against 5.7 s
with one thread). One query gains nothing from more threads, so a process that decodes with a dense
drafter runs every OpenBLAS on one thread. Index builds are not decode loops and keep every core
(they run in their own processes and never build a drafter).

OpenMP is left alone on purpose: ``faiss.omp_set_num_threads`` (and any ``omp_set_num_threads``
call) binds to the first libgomp the process loaded, which is torch's when torch is imported
first, so it would set torch's own thread count (measured: a float32 matmul 2x slower after
``faiss.omp_set_num_threads(1)``, ``torch.get_num_threads()`` then 1). FAISS's parallel regions
share that pool.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_done = False


def single_threaded_blas() -> None:
    """Every OpenBLAS in the process (numpy's, FAISS's) to one thread; torch's pools (OpenMP,
    MKL, oneDNN) untouched. Once per process."""
    global _done
    with _lock:
        if _done:
            return
        from threadpoolctl import ThreadpoolController

        ThreadpoolController().select(internal_api="openblas").limit(limits=1)
        _done = True
