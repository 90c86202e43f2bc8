"""Quality measures for resumed caches, shared by the tests and bench/snapshot.py.

Both feed a fixed continuation in one forward over a cache built from a
``KVState`` at the true positions (teacher forcing), so every variant of a
cache (pruned, quantized) is judged on exactly the same tokens.
"""

from __future__ import annotations

import torch

from kvstore.state import KVState
from tracer import capture, kv_adapter


def prefilled_state(loaded, tokens: list[int], *, attention_scores: bool = False) -> KVState:
    """``tokens`` as a paused generation from one plain forward: all but the last cached, the last pending.

    With ``attention_scores`` the forward runs with eager attention and records the attention each
    entry received, as a traced session does while prefilling (heavy-hitter pruning needs it).
    """
    model = loaded.model
    implementation = model.config._attn_implementation
    if attention_scores:
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens[:-1]], device=loaded.device), use_cache=True,
                        output_attentions=attention_scores)
    finally:
        model.set_attn_implementation(implementation)
    fp = loaded.fingerprint
    keys, values = kv_adapter.cache_tensors(out.past_key_values, fp.num_layers, fp.num_kv_heads,
                                            fp.head_dim, loaded.dtype)
    received = capture.received_by_prompt(out.attentions).double().tolist() if attention_scores else None
    return KVState(keys, values, list(tokens), list(range(len(tokens) - 1)), fp, attention_scores=received)


def continuation_logits(loaded, state: KVState, continuation: list[int]) -> torch.Tensor:
    """Logits after the pending token and each of ``continuation[:-1]``, fed at their true positions."""
    feed = [state.token_ids[-1], *continuation[:-1]]
    cache = kv_adapter.cache_from_tensors(state.keys, state.values, loaded.model.config,
                                          loaded.device, loaded.dtype)
    start = state.next_position
    with torch.no_grad():
        out = loaded.model(
            input_ids=torch.tensor([feed], device=loaded.device),
            position_ids=torch.arange(start, start + len(feed), device=loaded.device).unsqueeze(0),
            attention_mask=torch.ones(1, state.cache_length + len(feed), dtype=torch.long, device=loaded.device),
            past_key_values=cache,
            use_cache=True,
        )
    return out.logits[0].float()


def perplexity(loaded, state: KVState, continuation: list[int]) -> float:
    """Perplexity of ``continuation`` given the cache."""
    logits = continuation_logits(loaded, state, continuation)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(continuation, device=logits.device))
    return float(torch.exp(nll))


def greedy_choices(loaded, state: KVState, continuation: list[int]) -> list[int]:
    """The greedy choice at every step of ``continuation`` (teacher forced)."""
    return continuation_logits(loaded, state, continuation).argmax(dim=-1).tolist()


def agreement(loaded, state: KVState, continuation: list[int], reference: list[int]) -> float:
    """Share of steps whose greedy choice equals ``reference``'s, both fed ``continuation``.

    With ``continuation == reference`` = the lossless greedy run, this is the
    greedy agreement of a lossy cache with the lossless resume.
    """
    chosen = greedy_choices(loaded, state, continuation)
    return sum(a == b for a, b in zip(chosen, reference)) / len(reference)
