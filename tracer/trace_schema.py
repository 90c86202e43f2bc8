"""The ``--dump`` JSON Lines schema (version 2) as checks: ``problems(lines)`` lists how a trace departs from it.

The README documents the schema in words; this module says the same as code,
so every writer (``--dump``, ``resume --dump``, the app's export) can be held to
it by a test, and a script can check a file it was given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

VERSION = 2
STOP_REASONS = ("eos", "stop", "max_tokens", "cancelled", "context_full", "paused")
NUMBER = (int, float)
HEADER = {"type": str, "version": int, "model": str, "fingerprint": dict, "device": str, "settings": dict,
          "messages": list, "prompt_tokens": list, "notices": list}
SETTINGS = {"sampling": dict, "top_k": int, "lens": bool, "attention": bool}
TOKEN = {"position": int, "id": int, "text": str}
CANDIDATE = {"token_id": int, "text": str, "prob": NUMBER}
STEP = {"type": str, "index": int, "position": int, "token_id": int, "text": str, "prob": NUMBER,
        "logprob": NUMBER, "entropy": NUMBER, "top": list, "attention": (dict, type(None)),
        "lens": (list, type(None)), "forced": bool, "extra": dict}
ATTRIBUTION = {"token_id": int, "embedding": NUMBER, "layers": list, "attention": (list, type(None)), "bias": NUMBER,
               "total": NUMBER, "error": NUMBER}
PROMPT = {"type": str, "tokens": list}
END = {"type": str, "stop_reason": str, "generated": int, "transcript_tokens": int, "reply": str}


def _fields(where: str, value: Any, spec: dict[str, Any]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    found = [f"{where}: no {name}" for name in spec if name not in value]
    found += [f"{where}: {name} is {type(value[name]).__name__}" for name, kind in spec.items()
              if name in value and (not isinstance(value[name], kind) or isinstance(value[name], bool) is not
                                    (kind is bool))]
    return found


def _candidates(where: str, top: list, limit: int) -> list[str]:
    found = [f"{where}: {len(top)} candidates, more than top_k {limit}"] if len(top) > limit else []
    for i, candidate in enumerate(top):
        found += _fields(f"{where}[{i}]", candidate, CANDIDATE)
        if not found and not 0.0 <= candidate["prob"] <= 1.0:
            found.append(f"{where}[{i}]: prob {candidate['prob']} is not in [0, 1]")
    return found


def _step(where: str, step: dict, settings: dict) -> list[str]:
    found = _fields(where, step, STEP)
    if found:
        return found
    found += _candidates(f"{where}.top", step["top"], settings["top_k"])
    if (step["lens"] is not None) != settings["lens"]:
        found.append(f"{where}: lens is {'set' if step['lens'] is not None else 'null'} but settings.lens is "
                     f"{settings['lens']}")
    for i, layer in enumerate(step["lens"] or []):
        found += _fields(f"{where}.lens[{i}]", layer, {"layer": int, "top": list})
        if isinstance(layer, dict) and isinstance(layer.get("top"), list):
            found += _candidates(f"{where}.lens[{i}].top", layer["top"], settings["top_k"])
    if settings.get("attribution"):  # opt-in (--attribution): then on every step, null where not computable
        if "attribution" not in step:
            found.append(f"{where}: no attribution but settings.attribution is true")
        elif step["attribution"] is not None:
            found += _fields(f"{where}.attribution", step["attribution"], ATTRIBUTION)
    attention = step["attention"]
    if attention is not None:
        found += _fields(f"{where}.attention", attention, {"positions": list, "mean": list, "per_layer": list})
        if not found and len(attention["positions"]) != len(attention["mean"]):
            found.append(f"{where}.attention: {len(attention['positions'])} positions but "
                         f"{len(attention['mean'])} weights")
    elif settings["attention"]:
        found.append(f"{where}: attention is null but settings.attention is true")
    return found


def problems(lines: list[dict]) -> list[str]:
    """Every way ``lines`` (parsed JSON objects) break the schema; empty for a valid trace.

    Besides each line's fields: one header first, one end last, steps numbered 0, 1, ... and
    every transcript position 0 .. ``end.transcript_tokens - 1`` present exactly once, in order, across the
    header's ``prompt_tokens``, the ``prompt`` lines and the steps.
    """
    if len(lines) < 2:
        return ["a trace has at least a header and an end line"]
    first, last = lines[0], lines[-1]
    found = _fields("header", first, HEADER) + _fields("end", last, END)
    if found:
        return found
    if first["type"] != "header" or first["version"] != VERSION:
        found.append(f"line 1: expected a version {VERSION} header")
    found += _fields("header.settings", first["settings"], SETTINGS)
    if last["type"] != "end":
        found.append("last line: expected the end line")
    if last["stop_reason"] not in STOP_REASONS:
        found.append(f"end: stop_reason {last['stop_reason']!r} is not one of {', '.join(STOP_REASONS)}")
    if found:
        return found
    positions = []
    for i, token in enumerate(first["prompt_tokens"]):
        found += _fields(f"header.prompt_tokens[{i}]", token, TOKEN)
        positions.append(token.get("position") if isinstance(token, dict) else None)
    steps = 0
    for number, line in enumerate(lines[1:-1], start=2):
        kind = line.get("type") if isinstance(line, dict) else None
        if kind == "step":
            found += _step(f"line {number} (step)", line, first["settings"])
            if line.get("index") != steps:
                found.append(f"line {number}: step index {line.get('index')}, expected {steps}")
            positions.append(line.get("position"))
            steps += 1
        elif kind == "prompt":
            found += _fields(f"line {number} (prompt)", line, PROMPT)
            for i, token in enumerate(line.get("tokens") or []):
                found += _fields(f"line {number} (prompt).tokens[{i}]", token, TOKEN)
                positions.append(token.get("position") if isinstance(token, dict) else None)
        else:
            found.append(f"line {number}: unknown type {kind!r} (expected step or prompt)")
    if last["generated"] != steps:
        found.append(f"end: generated {last['generated']} but the file has {steps} steps")
    if positions != list(range(last["transcript_tokens"])):
        found.append(f"the transcript positions in the file are not 0 .. {last['transcript_tokens'] - 1} once "
                     "each, in order")
    return found


def read(text: Iterable[str]) -> list[dict]:
    """Parse JSON Lines (blank lines skipped)."""
    return [json.loads(line) for line in text if line.strip()]
