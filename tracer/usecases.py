"""The use cases: what a person does with kvtrace, written once for the command line and the app.

Open a session on a model, save it, load a snapshot into it, prune it, export
its trace, resume a snapshot, import a legacy cache. Headless (no textual, no
argparse): the CLI's commands are thin adapters that build these arguments
from flags, and the app's runner calls the same functions in its worker
thread. Progress is a callback; every expected failure is a ``TracerError`` or
``SnapshotError`` carrying one line in the project's voice (a lowercase
sentence fragment, no trailing period), which the CLI prints after
``kvtrace: error:`` and the app shows as a notification.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from kvstore.atomic import atomic_writer, output_target
from kvstore.errors import PruneError, SnapshotError
from kvstore.format import DEFAULT_CODEC
from kvstore.pruning import DEFAULT_SINKS, PruneSpec
from kvstore.snapshot import SnapshotInfo
from kvstore.state import KVState
from kvstore.store import Collected, EntryInfo, Store, default_store_path
from tracer import references
from tracer.errors import SettingsError, TracerError
from tracer.loading import EMBEDDED_NAME, LoadedModel, load_model, quiet_transformers
from tracer.protocol import Session
from tracer.sampling import SamplingSettings

if TYPE_CHECKING:
    from tracer.prune_preview import PrunePreview

Progress = Callable[[str], None]
MAX_TOP_K = 1000  # candidates recorded per step and lens layer; more only bloats every record


def _quiet(message: str) -> None:
    """The progress callback of callers that do not want any."""


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load and where: ``spec`` None is the embedded default."""

    spec: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    load_in_4bit: bool = False


@dataclass(frozen=True)
class TraceOptions:
    """What each step records, checked when built."""

    top_k: int = 10
    attention: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise SettingsError(f"--top-k must be 1 to {MAX_TOP_K}, not {self.top_k}")


# ---------------------------------------------------------------------------------------- open
def load(choice: ModelChoice, progress: Progress = _quiet) -> LoadedModel:
    """The one model loader of the CLI and the app (transformers' own progress bars silenced)."""
    quiet_transformers()
    return load_model(choice.spec, device=choice.device, dtype=choice.dtype, load_in_4bit=choice.load_in_4bit,
                      progress=progress)


def new_session(loaded: LoadedModel, sampling: SamplingSettings, options: TraceOptions) -> Session:
    """A trace session on an already loaded model."""
    from tracer.session import TraceSession

    vocab = loaded.fingerprint.vocab_size
    if options.top_k > vocab:
        raise SettingsError(f"--top-k must be at most the vocabulary size ({vocab}), not {options.top_k}")
    return TraceSession(loaded, sampling, top_k=options.top_k, capture_attention=options.attention)


def open_session(choice: ModelChoice, sampling: SamplingSettings, options: TraceOptions,
                 progress: Progress = _quiet) -> Session:
    """Load the model ``choice`` names and open a trace session on it."""
    return new_session(load(choice, progress), sampling, options)


# ------------------------------------------------------------------------------------ snapshots
@dataclass(frozen=True)
class Saved:
    path: str
    written: int  # bytes on disk (in a store: of the new chunks, blocks and the entry)
    tokens: int
    entries: int
    raw_bytes: int
    codec: str
    shared: int | None = None  # in a store: bytes of earlier chunks this entry reuses

    def describe(self) -> str:
        if self.shared is not None:
            return (f"saved {self.tokens} tokens ({self.entries} cached entries) to {self.path}: {self.written:,} "
                    f"new bytes, {self.shared:,} shared with earlier entries, codec {self.codec}")
        return (f"saved {self.tokens} tokens ({self.entries} cached entries) to {self.path}: {self.written:,} bytes, "
                f"codec {self.codec}, {self.written / max(self.raw_bytes, 1):.3f} of the raw K/V")


def save_state(state: KVState, path: str, codec: str = DEFAULT_CODEC, label: str | None = None,
               parent: str | None = None) -> Saved:
    """Write ``state`` to the reference ``path`` (a file atomically; a store entry sharing with ``parent``)."""
    if label:
        state.metadata["label"] = label
    written = references.save(state, references.parse(path), codec, references.parse(parent) if parent else None)
    return Saved(path, written.written, len(state.token_ids), state.cache_length, state.nbytes, codec, written.shared)


def save(session: Session, path: str, codec: str = DEFAULT_CODEC, label: str | None = None,
         parent: str | None = None) -> Saved:
    """Save the session's paused generation to the reference ``path``."""
    return save_state(session.export_state(), path, codec, label, parent)


def read_state(path: str, session: Session | None = None, *, max_bytes: int | None = None) -> KVState:
    """A snapshot's state (file or store entry) within the memory budget ``max_bytes`` (default: kvstore's).

    With a session it is refused, before any payload is decoded, unless it fits the session's model
    and context window.
    """
    ref = references.parse(path)
    if session is None:
        return references.load(ref, max_bytes=max_bytes)
    return references.load(ref, expected=session.loaded.fingerprint, max_tokens=session.loaded.context_limit,
                           max_bytes=max_bytes)


def read_info(path: str) -> SnapshotInfo:
    """The header of the snapshot ``path`` names (no payload read)."""
    return references.read_info(references.parse(path))


def verify(path: str, *, deep: bool = False) -> str:
    """Check every record of the snapshot ``path`` names; what was checked, or ``SnapshotError`` naming the damage."""
    return references.verify(references.parse(path), deep=deep).describe()


def check_output(path: str) -> None:
    """Refuse an output reference that cannot be written, before slow work."""
    references.check_output(references.parse(path))


@dataclass(frozen=True)
class Loaded:
    path: str
    tokens: int
    entries: int
    nbytes: int

    def describe(self) -> str:
        return f"loaded {self.path}: {self.tokens} tokens, {self.entries} cached entries, KV {self.nbytes:,} bytes"


def load_into(session: Session, path: str) -> Loaded:
    """Continue the session from the snapshot ``path`` names; the session is unchanged if it is refused."""
    state = read_state(path, session)
    session.import_state(state)
    return Loaded(path, len(state.token_ids), state.cache_length, state.nbytes)


# ----------------------------------------------------------------------------------------- store
def store_folder(path: str | None) -> Path:
    """The store folder ``path`` names (``None`` or empty: the default store)."""
    return Path(path).expanduser() if path else default_store_path()


def list_store(path: str | None) -> list[EntryInfo]:
    """The entries of a store, newest first."""
    return Store.open(store_folder(path)).entries()


def collect(path: str | None) -> Collected:
    return Store.open(store_folder(path)).gc()


def remove(path: str) -> None:
    ref = references.parse(path)
    if ref.store is None:
        raise SnapshotError(f"{path} is a file, not a store entry (DIR:NAME); delete files with rm")
    ref.open_store().remove(ref.name)


def export(path: str, output: str, codec: str | None = None) -> Saved:
    """Copy the snapshot ``path`` names (a store entry, usually) into ``output`` (in its codec, by default)."""
    check_output(output)
    codec = codec or read_info(path).codec
    return save_state(read_state(path), output, codec)


# -------------------------------------------------------------------------------------- pruning
@dataclass(frozen=True)
class Pruned:
    spec: PruneSpec
    entries_before: int
    entries_after: int
    bytes_before: int
    bytes_after: int
    tokens: int
    state: KVState

    def describe(self) -> str:
        return (f"pruned ({self.spec.describe()}): cached entries {self.entries_before} -> {self.entries_after}, "
                f"KV {self.bytes_before:,} -> {self.bytes_after:,} bytes; the transcript keeps its {self.tokens} "
                "tokens")


def prune_state(state: KVState, spec: PruneSpec, loaded: LoadedModel | None = None) -> Pruned:
    """``state`` pruned by ``spec``; the window methods run one forward on ``loaded`` (required for them)."""
    if spec.runs_model:
        if loaded is None:
            raise PruneError(f"{spec.method} runs the model on the last queries: load it (kvtrace prune loads the "
                             "snapshot's model, or --model)")
        from tracer.prune_preview import pruned_state

        pruned = pruned_state(loaded, state, spec)
    else:
        pruned = spec.apply(state)
    return Pruned(spec, state.cache_length, pruned.cache_length, state.nbytes, pruned.nbytes,
                  len(state.token_ids), pruned)


@dataclass(frozen=True)
class SessionPruned:
    """A prune of a live session, with the state before it (what ``undo_prune`` puts back)."""

    result: Pruned
    before: KVState

    def describe(self) -> str:
        return self.result.describe()


def _keeping_stop_reason(session: Session, state: KVState) -> None:
    """Import a state of the session's own transcript: the reply ended as it did (a prune is no new step)."""
    stop_reason = session.stop_reason
    session.import_state(state)
    session.stop_reason = stop_reason


def prune(session: Session, spec: PruneSpec) -> SessionPruned:
    """Prune the session's cache in place (its trace and records stay: only the cache changes)."""
    before = session.export_state()
    result = prune_state(before, spec, session.loaded)
    _keeping_stop_reason(session, result.state)
    return SessionPruned(result, before)


def preview_prune(session: Session, budget: int, sinks: int = DEFAULT_SINKS,
                  span: tuple[int, int] | None = None) -> PrunePreview:
    """What every method at ``budget`` would do to the session's next token; the session is not touched."""
    from tracer.prune_preview import preview

    if not session.token_ids:
        raise PruneError("there is nothing to preview yet: start a turn first")
    return preview(session.loaded, session.export_state(), budget, sinks=sinks, span=span)


@dataclass(frozen=True)
class PruneUndone:
    entries_before: int
    entries_after: int
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (f"prune undone: cached entries {self.entries_before} -> {self.entries_after}, "
                f"KV {self.bytes_before:,} -> {self.bytes_after:,} bytes")


def undo_prune(session: Session, before: KVState) -> PruneUndone:
    """Put back the cache as it was before a prune (``SessionPruned.before``), if the transcript is unchanged."""
    if before.token_ids != session.token_ids:
        raise PruneError("the transcript changed since the prune, so there is nothing to undo")
    entries, nbytes = len(session.positions), session.kv_bytes
    _keeping_stop_reason(session, before)
    return PruneUndone(entries, len(session.positions), nbytes, session.kv_bytes)


# -------------------------------------------------------------------------------------- traces
@contextmanager
def trace_output(target: str) -> Iterator[TextIO]:
    """Where a JSON Lines trace goes: stdout for ``-``, else ``target`` written atomically.

    The one writer of trace files (``--dump``, ``resume --dump``, the app's export): the file
    appears only once complete, with the permissions a plain ``open`` would give it.
    """
    if target == "-":
        yield sys.stdout
        return
    output_target(target)
    with atomic_writer(target) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        yield text
        text.flush()
        text.detach()


@dataclass(frozen=True)
class Exported:
    path: str
    steps: int

    def describe(self) -> str:
        return f"exported {self.steps} steps to {self.path}"


def export_trace(session: Session, path: str, *, with_lens: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> Exported:
    """Write everything the session traced so far as JSON Lines (the ``--dump`` schema).

    With ``with_lens`` every step's lens is computed (those not yet shown), ``progress(done, total)``
    told as the steps are written.
    """
    from tracer.dump import write_trace

    if not session.token_ids:
        raise TracerError("there is nothing to export yet: start a turn first")
    with trace_output(path) as out:
        write_trace(session, out, with_lens=with_lens, progress=progress)
    return Exported(path, len(session.records))


# ------------------------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class TensorsExported:
    path: str
    sidecar: str
    names: tuple[str, ...]
    written: int  # bytes of the tensors file

    def describe(self) -> str:
        return f"wrote {len(self.names)} tensors ({self.written:,} bytes) to {self.path}, described in {self.sidecar}"


def tensors_folder(folder: str) -> None:
    """Make ``--tensors DIR`` (and its parents) before the model loads, so a path that cannot be written costs
    nothing; ``TracerError`` in one line when it cannot be."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TracerError(f"cannot make the tensors folder {folder}: {error.strerror or error}") from None
    output_target(tensors_path(folder, 0))


def tensors_path(folder: str, index: int) -> str:
    """Where ``--tensors DIR`` puts generated token ``index``'s file."""
    return str(Path(folder) / f"step-{index:05d}.safetensors")


def export_tensors(session: Session, index: int, path: str) -> TensorsExported:
    """Generated token ``index``'s tensors to ``path`` (``.safetensors``) and a JSON sidecar beside it (same
    name, ``.json``): token, position, the ids that reproduce the step, the model's fingerprint. Both files
    are written atomically."""
    from safetensors.torch import save

    from tracer.tensor_export import sidecar

    if not 0 <= index < len(session.records):
        raise TracerError(f"there is no generated token {index} to export")
    target = Path(path)
    if target.suffix != ".safetensors":
        raise TracerError(f"the tensors file must end in .safetensors, not {target.name}")
    side = target.with_suffix(".json")
    output_target(target), output_target(side)  # both writable before anything is written
    record = session.records[index]
    tensors = session.step_tensors(index)
    data = save(tensors)
    description = sidecar(record, session.token_ids[: record.position], session.token_text(record.position),
                          session.loaded.name, session.loaded.fingerprint.to_dict(), list(tensors))
    with atomic_writer(side) as out:
        out.write((json.dumps(description, ensure_ascii=False, indent=1) + "\n").encode())
    with atomic_writer(target) as out:
        out.write(data)
    return TensorsExported(str(target), str(side), tuple(tensors), len(data))


# -------------------------------------------------------------------------------------- resume
@dataclass(frozen=True)
class ModelForSnapshot:
    """The model a resume will load for a snapshot, and why (``kvtrace info`` says it too)."""

    spec: str | None  # None: the embedded default
    reason: str


def model_for_snapshot(info: SnapshotInfo, given: str | None) -> ModelForSnapshot:
    """The user's ``--model`` if given; else the default model, or the local model the snapshot names.

    A snapshot never makes kvtrace load a model silently: a local path named in
    the file is used only when it exists, and the caller says so.
    """
    if given is not None:
        return ModelForSnapshot(given, f"{given} (--model)")
    named = info.fingerprint.model_id
    if named == EMBEDDED_NAME:
        return ModelForSnapshot(None, f"the embedded {EMBEDDED_NAME} (the snapshot's model)")
    if Path(named).expanduser().exists():
        return ModelForSnapshot(named, f"{named} (the local model the snapshot names)")
    raise SnapshotError(f"the snapshot was made by {named}, which is not on this machine; "
                        "pass --model with that model's folder or .gguf file")


@dataclass(frozen=True)
class ResumeRequest:
    source: str
    model: ModelChoice
    sampling: dict  # the sampling flags given on the command line (None: not given)
    steps: int = 64
    continue_text: str | None = None
    options: TraceOptions = TraceOptions()
    max_bytes: int | None = None  # memory budget for the decoded state (default: kvstore's)


def resumed_sampling(metadata: dict, given: dict, steps: int) -> SamplingSettings:
    """The snapshot's own sampling settings, with the flags the user gave on top."""
    saved = SamplingSettings.from_dict(metadata.get("sampling"))
    return saved.overridden(**given).overridden(max_new_tokens=max(steps, 1))


def resume(request: ResumeRequest, progress: Progress = _quiet) -> Session:
    """Open the snapshot's model, load the snapshot, and add the user's message if any (not generating yet).

    Every record's checksum is verified before the model loads (a damaged file costs no load time), and
    the payloads are decoded only once the model is known to fit.
    """
    info = read_info(request.source)
    verify(request.source)
    plan = model_for_snapshot(info, request.model.spec)
    progress(f"resuming with {plan.reason}")
    choice = ModelChoice(plan.spec, request.model.device, request.model.dtype, request.model.load_in_4bit)
    sampling = resumed_sampling(info.metadata, request.sampling, request.steps)
    session = open_session(choice, sampling, request.options, progress)
    session.import_state(read_state(request.source, session, max_bytes=request.max_bytes))
    if request.continue_text:
        session.start_turn(request.continue_text)
    return session


# -------------------------------------------------------------------------------------- legacy
def read_token_file(path: str) -> list[int]:
    """A JSON list of token ids."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SnapshotError(f"no token file at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(f"{path} is not a JSON list of token ids ({error})") from None
    if not (isinstance(data, list) and data and all(isinstance(t, int) and not isinstance(t, bool) for t in data)):
        raise SnapshotError(f"{path} is not a non-empty JSON list of integer token ids")
    return data


def import_legacy(source: str, output: str, choice: ModelChoice, *, tokens_file: str | None = None,
                  allow_pickle: bool = False, progress: Progress = _quiet) -> Saved:
    """Convert a KV cache saved with ``torch.save`` (or, with ``allow_pickle``, pickle) into a snapshot."""
    from kvstore.legacy import read_legacy, to_state

    check_output(output)
    legacy = read_legacy(source, allow_pickle=allow_pickle)
    token_ids = read_token_file(tokens_file) if tokens_file else legacy.token_ids
    if token_ids is None:
        raise SnapshotError(f"{source} carries no token ids; pass --tokens FILE (a JSON list of ids)")
    session = open_session(choice, SamplingSettings(), TraceOptions(), progress)
    session.import_state(to_state(legacy, token_ids, session.loaded.fingerprint))  # checks it fits the model
    return save(session, output, label=f"imported from {Path(source).name}")
