"""What the last queries of a transcript tell about the cache, per layer and KV head: the inputs of the
per-head pruning methods a saved state cannot feed by itself.

A state carries the attention its entries received over the whole traced run
(``KVState.head_scores``), not the most recent queries, which predict the next
ones best. One forward measures them: the state without its last
``window - 1`` entries is restored into a scratch engine and those tokens plus
the pending one are fed again at their true positions, the capture seeing
every layer's queries and keys (``Engine.observe``). The state itself is
never changed.

* ``window_scores`` (SnapKV, Li et al., 2024): the attention each entry
  receives from the window's queries, max-pooled over neighbouring entries.
* ``expected_scores`` (kvpress's ExpectedAttention, Devoto et al., 2025): the
  window's queries summarised as a Gaussian (mean and covariance, before
  RoPE), rotated to the average of the next ``FUTURE`` positions; an entry's
  score is the softmax weight such a query is expected to give it times its
  value's norm (what it can add to the output).
"""

from __future__ import annotations

import torch

from kvstore.errors import PruneError
from kvstore.pruning import DEFAULT_SINKS as SINKS
from kvstore.pruning import POOL, PruneSpec
from kvstore.state import KVState
from tracer.attention_hook import Recorder
from tracer.capture import ForwardCapture
from tracer.engine import Engine
from tracer.loading import LoadedModel

FUTURE = 512  # future positions the expected query is averaged over (kvpress's default)


def window_scores(loaded: LoadedModel, state: KVState, window: int) -> list[torch.Tensor]:
    """Per layer ``(kv_heads, n_l)`` float32 aligned with ``state.layer_positions(l)``: the attention each
    entry received from the last ``window`` queries (the pending token's included), averaged over them and
    the query heads of its KV head, max-pooled over ``POOL`` neighbouring entries."""
    recorder = ForwardCapture(state.num_layers, 4 << 20)
    count = _replay_window(loaded, state, window, recorder)
    queries = count * loaded.model.config.num_attention_heads / state.fingerprint.num_kv_heads
    scores = []
    for layer in range(state.num_layers):
        mean = recorder.received[layer][:, : state.layer_length(layer)].float().cpu() / queries
        scores.append(torch.nn.functional.max_pool1d(mean[:, None], POOL, stride=1, padding=POOL // 2)[:, 0]
                      if mean.shape[1] else mean)
    return scores


class _Queries:
    """A recorder keeping each layer's queries ``(heads, q, dim)`` (after RoPE) and its attention scaling."""

    def __init__(self, num_layers: int) -> None:
        self.queries: list[torch.Tensor | None] = [None] * num_layers
        self.scaling: list[float] = [1.0] * num_layers
        self.error: Exception | None = None

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, *,
                scaling: float, softcap: float | None, window: int | None) -> None:
        self.queries[layer], self.scaling[layer] = query[0].float().cpu(), scaling

    def failed(self, error: Exception) -> None:
        self.error = error


def expected_scores(loaded: LoadedModel, state: KVState, window: int) -> list[torch.Tensor]:
    """Per layer ``(kv_heads, n_l)`` float32: each entry's expected attention from the next queries (a
    Gaussian fitted to the last ``window`` queries, see the module docstring) times its value's norm."""
    recorder = _Queries(state.num_layers)
    _replay_window(loaded, state, window, recorder)
    positions = _window_positions(state, recorder.queries[0].shape[1])
    cos, sin = _rotation(loaded, positions)
    future_cos, future_sin = _rotation(loaded, list(range(state.next_position, state.next_position + FUTURE)))
    mean_cos, mean_sin = future_cos.mean(dim=0), future_sin.mean(dim=0)
    dim = cos.shape[-1]
    average = torch.diag(mean_cos) + torch.diag(mean_sin) @ _rotate_half_matrix(dim)
    scores = []
    for layer in range(state.num_layers):
        keys, values = state.keys[layer].float(), state.values[layer].float()
        if keys.shape[1] == 0:
            scores.append(torch.zeros(keys.shape[:2]))
            continue
        plain = recorder.queries[layer] * cos - _rotate_half(recorder.queries[layer]) * sin  # RoPE undone
        mean = plain.mean(dim=1)
        centred = plain - mean[:, None]
        covariance = centred.transpose(1, 2) @ centred / plain.shape[1]
        mean, covariance = mean @ average.T, average @ covariance @ average.T
        heads, kv_heads = mean.shape[0], keys.shape[0]
        grouped = keys.repeat_interleave(heads // kv_heads, dim=0)  # (heads, n, dim)
        scaling = recorder.scaling[layer]
        logits = (grouped @ mean[:, :, None])[..., 0] * scaling
        logits += torch.einsum("hnd,hde,hne->hn", grouped, covariance, grouped) * scaling ** 2 / 2
        logits[:, :SINKS] = float("-inf")  # the sinks are kept anyway; their weight would skew the others'
        weight = logits.softmax(dim=-1).view(kv_heads, heads // kv_heads, -1).mean(dim=1)
        scores.append(weight * values.norm(dim=-1))
    return scores


def _replay_window(loaded: LoadedModel, state: KVState, window: int, recorder: Recorder) -> int:
    """Feed the last ``window`` queries (at most; fewer when the heads do not all hold the last entries)
    with ``recorder`` seeing every layer; the number of queries fed."""
    refed = min(window - 1, state.cache_length)
    while True:
        try:
            prefix = state.select(list(range(state.cache_length - refed)))
            break
        except ValueError:  # per-head pruning left the heads different there: observe fewer queries
            refed -= 1
    positions = _window_positions(state, refed + 1)
    engine = Engine(loaded, capture_attention=True)
    engine.restore(prefix)
    if not engine.observe([state.token_ids[p] for p in positions], positions, recorder) or \
            getattr(recorder, "error", None) is not None:
        raise PruneError(f"{loaded.name}: its attention cannot be captured in place, so the window methods "
                         "cannot score entries; use head_heavy_hitters or sinks_recent")
    return len(positions)


def _window_positions(state: KVState, count: int) -> list[int]:
    """The positions of the last ``count`` queries: the last cached ones, then the pending token's."""
    return [*state.positions[state.cache_length - (count - 1):], state.next_position] if count > 1 \
        else [state.next_position]


def _rotation(loaded: LoadedModel, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's ``(len(positions), dim)`` cos and sin in the model's own convention (scaling included)."""
    rotary = next((m for name, m in loaded.model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        raise PruneError(f"{loaded.name} has no rotary embedding, which expected attention relies on; use "
                         "head_heavy_hitters or head_window")
    ids = torch.tensor([positions], device=loaded.device)
    probe = torch.zeros(1, device=loaded.device, dtype=torch.float32)
    cos, sin = rotary(probe, ids)
    return cos[0].float().cpu(), sin[0].float().cpu()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate_half_matrix(dim: int) -> torch.Tensor:
    """``P`` with ``P @ x == _rotate_half(x)``."""
    return _rotate_half(torch.eye(dim)).T


def observed_for(loaded: LoadedModel, state: KVState, spec: PruneSpec) -> list[torch.Tensor] | None:
    """What ``spec``'s method needs beyond the state (``PruneSpec.apply``'s ``observed``); None: nothing."""
    scorer = {"window": window_scores, "expected": expected_scores}.get(spec.needs)
    return None if scorer is None else scorer(loaded, state, spec.observed_queries)
