"""The selected token's details as plain text: what ``c`` copies (the panes' numbers, all of them)."""

from __future__ import annotations

from collections.abc import Callable

from tracer.records import Candidate, StepRecord
from tracer.token_text import visible
from tracer.lens import settling_layer


def _candidates(top: list[Candidate]) -> str:
    return ", ".join(f"{visible(c.text)!r} {c.prob:.4f}" for c in top)


def token_details(record: StepRecord, token_text: Callable[[int], str]) -> str:
    """Everything traced for ``record``: choice, probabilities, top-k, attention, and the lens if computed."""
    lines = [
        f"token #{record.index} at position {record.position}: {visible(token_text(record.position))!r} "
        f"(id {record.token_id}){' forced by a branch' if record.forced else ''}",
        f"p {record.prob:.4f}  logprob {record.logprob:.4f}  entropy {record.entropy:.4f} nats",
        f"top-k: {_candidates(record.top)}",
    ]
    if record.attention is not None:
        pairs = sorted(zip(record.attention.positions, record.attention.mean), key=lambda pw: -pw[1])[:10]
        lines.append("attention (mean over layers): "
                     + ", ".join(f"@{p} {visible(token_text(p))!r} {w:.4f}" for p, w in pairs))
    if record.lens:
        settle = settling_layer(record.lens, record.token_id)
        lines.append("lens" + (f" (settles at layer {settle})" if settle is not None else "") + ":")
        lines += [f"  L{layer.layer}: {_candidates(layer.top[:3])}" for layer in record.lens]
    return "\n".join(lines) + "\n"


def chat_text(messages: list[dict[str, str]], reply: str | None) -> str:
    """The conversation as ``role: text`` paragraphs."""
    parts = [f"{m['role']}: {m['content']}" for m in messages]
    if reply is not None:
        parts.append(f"assistant: {reply}")
    return "\n\n".join(parts) + "\n"
