"""Where SENSE keeps its local caches: ``$SENSE_CACHE_DIR``, default ``~/.cache/sense`` (converted
models, compiled kernels, measurements, demo datastores, localized index artifacts, the FAISS
indexes of dense datastores). One definition for every layer (decoding re-exports it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of SENSE's local caches (``$SENSE_CACHE_DIR``, default ``~/.cache/sense``)."""
    return Path(os.environ.get("SENSE_CACHE_DIR", Path.home() / ".cache" / "sense"))
