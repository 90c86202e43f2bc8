"""Dequantize a GGUF model once and keep the result on disk, keyed by the file's content.

Loading a GGUF file through transformers dequantizes every tensor and converts
the tokenizer (about 20 s for the embedded SmolLM2); the cached copy is a plain
safetensors folder that loads in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_FORMAT = 1  # bump when the cached folder's layout changes
SECONDS_PER_MB = 0.2  # a first load's pace when this machine has none on record (SmolLM2, 98 MB: ~20 s on 2 cores)
PACE_FILE = "first-load-pace.json"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/kvtrace`` (``~/.cache/kvtrace`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtrace"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_folder(gguf_path: Path, dtype_name: str) -> Path:
    """Where the dequantized copy of this exact file (by content) in this dtype lives."""
    return cache_root() / f"gguf-{file_digest(gguf_path)[:32]}-{dtype_name}-v{CACHE_FORMAT}"


def is_complete(folder: Path) -> bool:
    return (folder / "kvtrace-cache.json").is_file()


def write_cache(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """Write the folder atomically: built under a temporary name, then renamed into place.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights go through
    safetensors directly; tied weights are stored once, as transformers expects.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
                 if name not in tied}
        save_file(state, str(building / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        config.architectures = config.architectures or [type(model).__name__]
        config.save_pretrained(building)
        model.generation_config.save_pretrained(building)
        tokenizer.save_pretrained(building)
        marker = {"source": source.name, "format": CACHE_FORMAT}
        (building / "kvtrace-cache.json").write_text(json.dumps(marker))
        try:
            os.rename(building, folder)
        except OSError:
            if not is_complete(folder):  # someone else finished first: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def expected_first_load(gguf_path: Path) -> float:
    """Seconds a first load of ``gguf_path`` should take: its size at this machine's last pace (or the default)."""
    megabytes = gguf_path.stat().st_size / 1e6
    try:
        pace = float(json.loads((cache_root() / PACE_FILE).read_text())["seconds_per_mb"])
    except (OSError, ValueError, KeyError, TypeError):
        pace = SECONDS_PER_MB
    return megabytes * (pace if 0 < pace < 60 else SECONDS_PER_MB)


def record_first_load(gguf_path: Path, seconds: float) -> None:
    """Remember this machine's pace for the next estimate; a cache that cannot be written is no error."""
    megabytes = gguf_path.stat().st_size / 1e6
    try:
        cache_root().mkdir(parents=True, exist_ok=True)
        (cache_root() / PACE_FILE).write_text(json.dumps({"seconds_per_mb": seconds / max(megabytes, 1e-6)}))
    except OSError:
        pass
