"""Local paths and ``s3://`` URIs behind one small API (fsspec; s3fs for S3).

S3 credentials and a custom endpoint come from the standard environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``)
or from ``storage_options`` passed explicitly.

Atomicity: a local write goes to a temporary sibling and is renamed into place; an S3 PUT is
atomic per object. Writers of multi-file artifacts write their manifest last, so a reader never
takes a partial artifact for a complete one.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import fsspec


class StorageError(OSError):
    """A path or URI could not be read or written."""


def is_remote(uri: str | Path) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _endpoint_options() -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def open_fs(uri: str | Path, storage_options: dict | None = None):
    """(filesystem, path inside it) for a local path or a URI such as ``s3://bucket/prefix``."""
    uri = str(uri)
    if not is_remote(uri):
        return fsspec.filesystem("file"), str(Path(uri.removeprefix("file://")).absolute())
    protocol = uri.split("://", 1)[0]
    options = dict(_endpoint_options() if protocol in ("s3", "s3a") else {})
    options.update(storage_options or {})
    fs, path = fsspec.core.url_to_fs(uri, **options)
    # Listings are cached per instance; a datastore written by another process must be seen.
    fs.invalidate_cache()
    return fs, path


def join(uri: str | Path, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


def exists(uri: str | Path) -> bool:
    """Whether an object or directory is at `uri` (remote errors retried, then StorageError: a
    resumed build checks its finished units' files this way, and an outage then must end it in
    one line, not a botocore traceback)."""
    fs, path = open_fs(uri)
    return _retrying(uri, "check", lambda: fs.exists(path))


RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)     # transient remote errors: retried with these back-offs
RETRY_ENV = "SENSE_STORAGE_RETRY_DELAYS"  # comma-separated seconds, e.g. "1,5,30"; empty: no retries


def retry_delays() -> tuple[float, ...]:
    """The back-offs between attempts at a remote read or write: ``$SENSE_STORAGE_RETRY_DELAYS``
    if set, else RETRY_DELAYS_S. These come on top of s3fs's own retries of one request (about
    12 s against an unreachable endpoint), so an outage surfaces after roughly (retries + 1) x 12 s
    plus the delays."""
    raw = os.environ.get(RETRY_ENV)
    if raw is None:
        return RETRY_DELAYS_S
    try:
        delays = tuple(float(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r}: expected comma-separated seconds such as 1,5,30") from None
    if any(d < 0 for d in delays):
        raise StorageError(f"{RETRY_ENV}={raw!r}: delays cannot be negative")
    return delays


def _retrying(uri, what: str, fn):
    """Run fn(); on a remote storage error retry with back-off, then raise StorageError. Local
    errors and a missing object are not retried (FileNotFoundError propagates as is)."""
    delays = retry_delays() if is_remote(uri) else ()
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as exc:  # network and permission errors from s3fs/botocore, OSError locally
            if attempt == len(delays):
                raise StorageError(f"{uri}: could not {what} ({type(exc).__name__}: {exc})") from None
            time.sleep(delays[attempt])


def read_bytes(uri: str | Path) -> bytes:
    fs, path = open_fs(uri)
    return _retrying(uri, "read", lambda: fs.cat_file(path))


def write_bytes_atomic(uri: str | Path, data: bytes) -> None:
    """Write a whole object: readers see the old content or the new one, never a prefix."""
    fs, path = open_fs(uri)
    if not is_remote(uri):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    _retrying(uri, "write", lambda: fs.pipe_file(path, data))


def upload_file(local: str | Path, uri: str | Path) -> None:
    """Copy a local file to `uri` (atomic rename locally, one PUT/multipart upload on S3)."""
    if not is_remote(uri):
        target = Path(open_fs(uri)[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = open_fs(uri)
    try:
        fs.put_file(str(local), path)
    except Exception as exc:
        raise StorageError(f"{uri}: could not upload ({exc})") from None


def download_file(uri: str | Path, local: str | Path) -> None:
    fs, path = open_fs(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise StorageError(f"{uri}: could not download ({exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def list_names(uri: str | Path) -> list[str] | None:
    """The names directly under `uri`, sorted ([] if nothing is there), or None if `uri` is a file
    (remote errors retried, then StorageError)."""
    fs, path = open_fs(uri)

    def look():
        if fs.isfile(path):
            return None
        try:
            entries = fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    return _retrying(uri, "list", look)


def list_files(uri: str | Path) -> list[str]:
    """Paths (relative to `uri`) of all files under it, sorted; [] if it does not exist."""
    fs, path = open_fs(uri)
    if not exists(uri):
        return []
    base = path.rstrip("/") + "/"
    return sorted(p[len(base):] if p.startswith(base) else p.removeprefix(base.lstrip("/"))
                  for p in _retrying(uri, "list", lambda: fs.find(path)))
