"""Exact-resume checks shared by the API and command tests (and their one SmolLM2 test).

References are independent of the snapshot path: an uninterrupted session,
and plain transformers forwards without any cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvstore import snapshot
from tracer.quality import continuation_logits
from tracer.session import TraceSession

REPO = Path(__file__).resolve().parents[1]


def kvtrace(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """``kvtrace ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tui_app", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def uninterrupted(loaded, prompt: str, steps: int) -> TraceSession:
    session = TraceSession(loaded)
    session.start_turn(prompt)
    session.generate(steps)
    assert len(session.records) == steps, session.stop_reason
    return session


def plain_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log-softmax at every position of one cache-free forward over ``token_ids``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def pending_logits(loaded, state) -> torch.Tensor:
    """Logits for the pending token, fed at its true position over the state's cache."""
    return continuation_logits(loaded, state, [0])[-1]


def check_api_resume(loaded, tmp_path: Path, prompt: str, reference: TraceSession, before: int) -> None:
    """Save after ``before`` tokens, load, resume: the rest equals ``reference`` token for token."""
    after = len(reference.records) - before
    first = TraceSession(loaded)
    first.start_turn(prompt)
    first.generate(before)
    path = tmp_path / "api.kvs"
    snapshot.save(first.export_state(), path)
    del first

    state = snapshot.load(path, expected=loaded.fingerprint)
    full = plain_logprobs(loaded.model, reference.token_ids[:-1])
    at_resume = torch.log_softmax(pending_logits(loaded, state), dim=-1)
    assert torch.allclose(at_resume, full[state.next_position], atol=1e-4)

    resumed = TraceSession(loaded)
    resumed.import_state(state)
    records = resumed.generate(after)
    assert [r.token_id for r in records] == [r.token_id for r in reference.records[before:]]
    assert resumed.token_ids == reference.token_ids
    for record, ref in zip(records, reference.records[before:]):
        assert record.position == ref.position
        assert record.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert record.logprob == pytest.approx(full[record.position - 1, record.token_id].item(), abs=1e-4)


def check_command_resume(loaded, model: str | None, tmp_path: Path, prompt: str,
                         reference: TraceSession, before: int) -> None:
    """``kvtrace save`` then ``kvtrace resume`` in subprocesses equal ``reference``."""
    after = len(reference.records) - before
    saved, resumed, dump = tmp_path / "cmd.kvs", tmp_path / "cmd-after.kvs", tmp_path / "trace.jsonl"
    model_args = ["--model", model] if model else []
    result = kvtrace("save", "--prompt", prompt, "-o", saved, *model_args, "--steps", before, "--label", "demo")
    assert result.returncode == 0, result.stderr
    # no --model: the snapshot names its local model folder (or the embedded default)
    result = kvtrace("resume", saved, "--steps", after, "-o", resumed, "--dump", dump)
    assert result.returncode == 0, result.stderr

    state = snapshot.load(resumed, expected=loaded.fingerprint)
    assert state.token_ids == reference.token_ids  # token for token over `after` steps
    assert result.stdout.strip() == reference.reply_text().strip()
    steps = [json.loads(line) for line in dump.read_text().splitlines()]
    steps = [line for line in steps if line["type"] == "step"]
    # the snapshot carried the first ``before`` steps: the dump holds the whole line
    assert [s["token_id"] for s in steps] == [r.token_id for r in reference.records]
    for step, ref in zip(steps, reference.records):
        assert step["position"] == ref.position
        assert step["logprob"] == pytest.approx(ref.logprob, abs=1e-4)
    expected = reference.export_state()
    assert torch.allclose(pending_logits(loaded, state), pending_logits(loaded, expected), atol=1e-4)
