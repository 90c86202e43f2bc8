"""Snapshot benchmark: kvtrace codecs against pickle, gzip-pickle and torch.save, in one run.

For 1024- and 4096-token caches of the default model (SmolLM2-135M-Instruct,
or ``--model``), built by prefilling real text through the tracer session, it
measures bytes, save seconds and load seconds of every format; the lossless
load against kvtrace 0.1's single-threaded reader loop (kept below as the
reference) and a bytes-vs-seconds frontier of every codec next to recomputing
the prefill; greedy agreement of each lossy codec with the lossless resume over
64 tokens; resume time to first token against recomputing the prefill; and the
perplexity cost of pruning (sinks + recent and attention heavy hitters against
keep-last at the same budget). Every figure is printed next to its reference
and the issue's target. ``--quick`` measures the files only (no agreement,
time to first token or pruning).

    python bench/snapshot.py [--lengths 1024 4096] [--repeats 3] [--quick]
                             [--model SPEC] [--device cpu] [--dtype auto]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not another install

from kvstore import format as fmt  # noqa: E402
from kvstore import pruning, snapshot  # noqa: E402
from kvstore.format import CODEC_NAMES  # noqa: E402
from kvstore.header import decode_header  # noqa: E402
from kvstore.pipeline import default_threads  # noqa: E402
from kvstore.records import read_header  # noqa: E402
from kvstore.state import KVState  # noqa: E402
from tracer.loading import load_model  # noqa: E402
from tracer.quality import agreement, perplexity, prefilled_state, sample_text  # noqa: E402
from tracer.session import TraceSession  # noqa: E402
from resume_timing import timed_resume  # noqa: E402  (bench/, beside this script)

CODECS = list(CODEC_NAMES)
BYTES_TARGET = {"lossless": 0.80, "fp16": 0.40, "int8": 0.25, "int4": 0.15}  # x torch.save bytes
AGREEMENT_TARGET = 0.95
LOSSLESS_SAVE_TARGET = 0.25  # x gzip-pickle save seconds
TTFT_TARGET = 0.10  # x prefill time to first token, at 1024 tokens
TTFT_CODECS = ("lossless", "raw", "int8")
READER_TARGET = 3.0  # x kvtrace 0.1's lossless load throughput


def fsynced(write: Callable[[object], None]) -> Callable[[Path], None]:
    """A legacy writer that, like kvtrace, makes the file durable before returning."""
    def save(path: Path) -> None:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return save


def legacy_formats(layers: tuple) -> dict[str, tuple[Callable[[Path], None], Callable[[Path], object]]]:
    def gzip_dump(f) -> None:
        with gzip.GzipFile(fileobj=f, mode="wb") as z:  # gzip's default level, 9
            pickle.dump(layers, z, protocol=pickle.HIGHEST_PROTOCOL)

    def gzip_load(path: Path) -> object:
        with gzip.open(path, "rb") as z:
            return pickle.load(z)  # noqa: S301 - our own file

    def pickle_load(path: Path) -> object:
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - our own file

    return {
        "pickle": (fsynced(lambda f: pickle.dump(layers, f, protocol=pickle.HIGHEST_PROTOCOL)), pickle_load),
        "gzip-pickle": (fsynced(gzip_dump), gzip_load),
        "torch.save": (fsynced(lambda f: torch.save(layers, f)),
                       lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    }


def best_of(repeats: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_load(path: Path) -> list[torch.Tensor]:
    """kvtrace 0.1's reader loop, kept only as this benchmark's reference (lossless, fp16, bf16 files).

    One record after another on one thread: read the whole frame, checksum it,
    decompress it through a stream into a new buffer, unshuffle it by
    transposing the whole byte matrix. Records 0.1 did not have (the trace a
    snapshot now carries) are read, checked and decoded, then left aside.
    """
    tensors = []
    with open(path, "rb") as f:
        version, data, _ = read_header(f, os.fstat(f.fileno()).st_size, path)
        header = decode_header(data, version)
        for spec in header.records():
            length, crc = fmt.RECORD.unpack(f.read(fmt.RECORD.size))
            frame = f.read(length)
            assert zlib.crc32(frame) == crc
            out = bytearray(spec.decoded)
            view, filled = memoryview(out), 0
            decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 27)
            with decompressor.stream_reader(io.BytesIO(frame), read_across_frames=False) as reader:
                while filled < spec.decoded and (n := reader.readinto(view[filled:])):
                    filled += n
            if spec.kind not in ("key", "value"):
                continue  # the trace (and per-head tables): 0.1 files had none, its bytes are read and checked
            store = header.codec.store or header.dtype
            size = torch.empty((), dtype=store).element_size()
            planes = torch.frombuffer(out, dtype=torch.uint8).reshape(size, -1)
            shape = header.shape(spec.layer, spec.kind)
            tensors.append(planes.t().contiguous().view(store).reshape(shape).to(header.dtype))
    return tensors


def build_session(loaded, ids: list[int], length: int) -> tuple[TraceSession, float, str]:
    """A session whose transcript is ``length`` tokens: real text wrapped as one user message."""
    session = TraceSession(loaded, capture_attention=False)
    template = loaded.tokenizer.apply_chat_template([{"role": "user", "content": ""}],
                                                    add_generation_prompt=True, tokenize=False)
    overhead = len(loaded.tokenizer(template)["input_ids"])
    text = loaded.tokenizer.decode(ids[: length - overhead])
    start = time.perf_counter()
    session.start_turn(text)
    return session, time.perf_counter() - start, text


def measure_formats(state: KVState, folder: Path, repeats: int) -> dict[str, dict[str, float]]:
    layers = tuple((k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(state.keys, state.values))
    rows: dict[str, dict[str, float]] = {}
    for name, (save, load) in legacy_formats(layers).items():
        path = folder / f"{name}.bin"
        rows[name] = {"save": best_of(repeats, lambda: save(path)), "bytes": path.stat().st_size,
                      "load": best_of(repeats, lambda: load(path))}
    for codec in CODECS:
        path = folder / f"{codec}.kvs"
        rows[codec] = {"save": best_of(repeats, lambda: snapshot.save(state, path, codec=codec)),
                       "bytes": path.stat().st_size, "load": best_of(repeats, lambda: snapshot.load(path)),
                       "load 1 thread": best_of(repeats, lambda: snapshot.load(path, threads=1))}
    reference = reference_load(folder / "lossless.kvs")
    assert all(torch.equal(a, b) for a, b in zip(reference[::2], snapshot.load(folder / "lossless.kvs").keys))
    rows["lossless"]["reference load"] = best_of(repeats, lambda: reference_load(folder / "lossless.kvs"))
    return rows


def report_frontier(rows: dict, raw_bytes: int, prefill: float) -> None:
    """The lossless reader against kvtrace 0.1's, then bytes against seconds for every codec."""
    lossless = rows["lossless"]
    base = lossless["reference load"]
    mb = raw_bytes / 1e6
    print(f"lossless load: kvtrace 0.1's reader {base:.3f} s ({mb / base:.0f} MB/s); this reader, 1 thread "
          f"{lossless['load 1 thread']:.3f} s ({base / lossless['load 1 thread']:.2f}x), {default_threads()} threads "
          f"{lossless['load']:.3f} s ({mb / lossless['load']:.0f} MB/s, {base / lossless['load']:.2f}x; "
          f"target >= {READER_TARGET:.0f}x: {verdict(base / lossless['load'] >= READER_TARGET)})")
    print(f"frontier (recomputing the prefill instead: {prefill:.3f} s)")
    print(f"{'codec':<10}{'bytes':>12}{'x raw K/V':>11}{'save s':>9}{'load s':>9}{'1 thread':>10}{'load MB/s':>11}"
          f"{'x prefill':>11}")
    for codec in CODECS:
        row = rows[codec]
        print(f"{codec:<10}{row['bytes']:>12}{row['bytes'] / raw_bytes:>11.3f}{row['save']:>9.3f}{row['load']:>9.3f}"
              f"{row['load 1 thread']:>10.3f}{mb / row['load']:>11.0f}{row['load'] / prefill:>11.3f}")


def time_to_first_token(loaded, folder: Path, text: str, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds to the first new token from a fresh session: by prefilling, or from a snapshot.

    Per path, the stages of its fastest run; "step" is the decode of the first
    token, which both paths pay.
    """
    def from_prefill() -> dict[str, float]:
        start = time.perf_counter()
        session = TraceSession(loaded, capture_attention=False)
        session.start_turn(text)
        middle = time.perf_counter()
        session.step()
        return {"prefill": middle - start, "step": time.perf_counter() - middle}

    def fastest(run: Callable[[], dict[str, float]]) -> dict[str, float]:
        stages = min((run() for _ in range(repeats)), key=lambda r: sum(r.values()))
        return {**stages, "total": sum(stages.values())}

    return {"prefill": fastest(from_prefill), **{codec: fastest(timed_resume(loaded, lambda c=codec: snapshot.load(folder / f"{c}.kvs",
                                                                      expected=loaded.fingerprint)))
                                       for codec in TTFT_CODECS}}


def pruning_quality(loaded, ids: list[int], length: int) -> list[tuple[int, float, float, float, float]]:
    """(budget, full, sinks+recent, heavy hitters, keep-last) perplexities of the 64 tokens after ``length``."""
    start = 3000  # a stretch of prose well inside the text
    state = prefilled_state(loaded, ids[start:start + length], attention_scores=True)
    continuation = ids[start + length:start + length + 64]
    full = perplexity(loaded, state, continuation)
    return [(budget, full,
             perplexity(loaded, pruning.sinks_recent(state, 4, budget - 4), continuation),
             perplexity(loaded, pruning.heavy_hitters(state, budget, sinks=4), continuation),
             perplexity(loaded, pruning.keep_last(state, budget), continuation))
            for budget in (64, 128, 256)]


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def report(length: int, dtype: torch.dtype, rows: dict, agreements: dict, ttft: dict | None,
           prefill: float) -> None:
    """The formats table and the targets; agreements and time to first token when they were measured."""
    ref = rows["torch.save"]
    gzip_save = rows["gzip-pickle"]["save"]
    print(f"\n## {length}-token cache ({rows['pickle']['bytes'] / 2**20:.1f} MiB of {dtype} K/V"
          + ("; greedy agreement over 64 tokens with the lossless resume)" if agreements else ")"))
    print(f"{'format':<12}{'bytes':>12}{'x torch.save':>14}{'save s':>9}{'x gzip save':>13}"
          f"{'load s':>9}{'agree@64':>10}")
    for name, row in rows.items():
        agree = f"{agreements[name]:.3f}" if name in agreements else ""
        print(f"{name:<12}{row['bytes']:>12}{row['bytes'] / ref['bytes']:>14.3f}{row['save']:>9.3f}"
              f"{row['save'] / gzip_save:>13.3f}{row['load']:>9.3f}{agree:>10}")
    print("targets:")
    lossless = rows["lossless"]
    print(f"  lossless bytes {lossless['bytes'] / ref['bytes']:.3f}x torch.save (target <= 0.80): "
          f"{verdict(lossless['bytes'] / ref['bytes'] <= 0.80)}")
    print(f"  lossless save {lossless['save'] / gzip_save:.3f}x gzip-pickle (target <= 0.25): "
          f"{verdict(lossless['save'] / gzip_save <= LOSSLESS_SAVE_TARGET)}")
    for codec in ("fp16", "int8", "int4") if agreements else ():
        ratio = rows[codec]["bytes"] / ref["bytes"]
        ok = ratio <= BYTES_TARGET[codec] and agreements[codec] >= AGREEMENT_TARGET
        print(f"  {codec} bytes {ratio:.3f}x torch.save (target <= {BYTES_TARGET[codec]:.2f}), "
              f"agreement {agreements[codec]:.3f} (target >= 0.95): {verdict(ok)}")
    if ttft is None:
        return
    base = ttft["prefill"]
    print(f"  time to first token: prefill {base['total']:.3f} s (prefill {base['prefill']:.3f} + "
          f"first step {base['step']:.3f}; the first, cold build took {prefill:.3f} s)")
    for codec in TTFT_CODECS:
        run = ttft[codec]
        line = (f"  resume from {codec}: {run['total']:.3f} s = {run['total'] / base['total']:.3f}x "
                f"(load {run['load']:.3f} + import {run['import']:.3f} + first step {run['step']:.3f}; "
                f"without the step both paths share: {(run['load'] + run['import']) / base['prefill']:.3f}x)")
        if length == 1024:
            line += f" target <= 0.10: {verdict(run['total'] / base['total'] <= TTFT_TARGET)}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--quick", action="store_true",
                        help="files only: no agreement, time to first token or pruning quality")
    parser.add_argument("--model", default=None, help="model spec as for kvtrace --model (default: SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = loaded.tokenizer(sample_text())["input_ids"]
    print(f"model {loaded.name} ({loaded.dtype} on {loaded.device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {default_threads()} snapshot threads, "
          f"text of {len(ids)} tokens; timings are the best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for length in args.lengths:
            session, prefill, text = build_session(loaded, ids, length)
            state = session.export_state()
            rows = measure_formats(state, folder, args.repeats)
            agreements, ttft = {}, None
            if not args.quick:
                lossless_run = [r.token_id for r in session.generate(64)]
                for codec in CODECS:
                    decoded = snapshot.load(folder / f"{codec}.kvs", expected=loaded.fingerprint)
                    agreements[codec] = agreement(loaded, decoded, lossless_run, lossless_run)
                ttft = time_to_first_token(loaded, folder, text, args.repeats)
            report(length, state.keys[0].dtype, rows, agreements, ttft, prefill)
            report_frontier(rows, state.nbytes, ttft["prefill"]["prefill"] if ttft else prefill)
    if args.quick:
        return
    print("\n## pruning: perplexity of the next 64 tokens of real text after a 1024-token cache")
    print(f"{'budget':>8}{'full cache':>12}{'sinks 4 + recent':>18}{'heavy hitters':>15}{'keep-last':>11}")
    for budget, full, sinks, heavy, last in pruning_quality(loaded, ids, 1024):
        print(f"{budget:>8}{full:>12.2f}{sinks:>18.2f}{heavy:>15.2f}{last:>11.2f}")


if __name__ == "__main__":
    main()
