"""Synthetic KV states for the kvstore tests: real shapes and dtypes, no model needed."""

from __future__ import annotations

import torch

from kvstore.state import KVState, ModelFingerprint

FINGERPRINT = ModelFingerprint(
    model_id="synthetic",
    architecture="LlamaForCausalLM",
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    dtype="float32",
    vocab_size=1000,
    rope={"rope_theta": 10000.0, "rope_type": "default"},
    tokenizer_hash="0123abcd",
)


def make_state(length: int = 40, dtype: torch.dtype = torch.float32, *, seed: int = 0,
               scores: bool = True) -> KVState:
    """A state of ``length`` cached entries plus one pending token, with outlier channels and sinks."""
    g = torch.Generator().manual_seed(seed)
    shape = (FINGERPRINT.num_kv_heads, length, FINGERPRINT.head_dim)

    def tensor() -> torch.Tensor:
        t = torch.randn(shape, generator=g)
        t[:, :, 0] += 6.0  # an outlier channel, as real keys have
        if length:
            t[:, 0] *= 10.0  # a large first (sink) entry
        return t.to(dtype)

    keys = [tensor() for _ in range(FINGERPRINT.num_layers)]
    values = [tensor() for _ in range(FINGERPRINT.num_layers)]
    attention = torch.rand(length, generator=g).tolist() if scores else None
    return KVState(
        keys=keys,
        values=values,
        token_ids=torch.randint(0, 1000, (length + 1,), generator=g).tolist(),
        positions=list(range(length)),
        fingerprint=FINGERPRINT,
        attention_scores=attention,
        metadata={"messages": [{"role": "user", "content": "héllo"}],
                  "sampling": {"temperature": 0.0, "stop": ["</s>"]}, "label": "t", "created": 1.5},
    )
