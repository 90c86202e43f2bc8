"""One step's tensors for a notebook: what a ``.safetensors`` file holds, and its JSON sidecar.

The names follow transformers' own outputs where there is one, so the file
lines up with a run of the same model in transformers, TransformerLens or
nnsight on the sidecar's ``input_ids``: ``hidden_states`` is the model's
``output_hidden_states`` at the step's fed position (the embedding, each
layer's output, the last one through the final norm) and ``logits`` its
output there. The attention is what the trace kept (the strongest entries),
never full rows.
"""

from __future__ import annotations

from typing import Any

import torch

from tracer.lens import LogitLens
from tracer.records import StepRecord
from tracer.residual import StepTensors

DESCRIPTIONS = {
    "hidden_states": "(layers + 1, d): the stream before the first layer, after each layer, and the last layer's "
                     "output through the final norm (transformers' output_hidden_states at the fed position)",
    "hidden_states_intermediate": "(layers - 1, d): the stream after each layer but the last (the model's final "
                                  "norm was not found, so nothing more was kept)",
    "resid_final": "(d,): the last layer's output before the final norm",
    "attn_out": "(layers, d): what each layer's attention block added to the stream",
    "logits": "(vocab,): the model's output logits at the step, recomputed from resid_final",
    "attention_positions": "(n,) int32: transcript positions of attention_mean",
    "attention_mean": "(n,): attention over those positions, averaged over layers and heads",
    "attention_layer_positions": "(layers, 8) int32: per layer, the positions of the strongest head-mean entries "
                                 "(-1: none)",
    "attention_layer_weights": "(layers, 8): their weights",
    "attention_head_positions": "(layers, heads, 8) int32: per layer and query head, the strongest positions "
                                "(-1: none)",
    "attention_head_weights": "(layers, heads, 8): their weights",
}


def step_tensors(record: StepRecord, tensors: StepTensors, logits: torch.Tensor | None,
                 lens: LogitLens | None) -> dict[str, torch.Tensor]:
    """The named tensors of one step (float32 or int32, on the CPU, contiguous: what safetensors stores)."""
    out: dict[str, torch.Tensor] = {}
    if tensors.complete and lens is not None:
        assert tensors.final is not None
        with torch.no_grad():
            normalized = lens.norm(tensors.final[None].to(lens.norm_device)).to(tensors.final.device)
        out["hidden_states"] = torch.cat([tensors.stream()[:-1], normalized])
        out["resid_final"] = tensors.final
    else:
        out["hidden_states_intermediate"] = tensors.hidden
    if tensors.attention is not None:
        out["attn_out"] = tensors.attention
    if logits is not None:
        out["logits"] = logits
    evidence = record.attention
    if evidence is not None:
        out["attention_positions"] = torch.tensor(evidence.positions.array)
        out["attention_mean"] = torch.tensor(evidence.mean.array)
        out["attention_layer_positions"] = torch.tensor(evidence.per_layer.positions)
        out["attention_layer_weights"] = torch.tensor(evidence.per_layer.weights)
        if evidence.per_head is not None:
            out["attention_head_positions"] = torch.tensor(evidence.per_head.positions)
            out["attention_head_weights"] = torch.tensor(evidence.per_head.weights)
    return {name: (t.float() if t.is_floating_point() else t.to(torch.int32)).detach().cpu().contiguous()
            for name, t in out.items()}


def sidecar(record: StepRecord, input_ids: list[int], text: str, model: str, fingerprint: dict[str, Any],
            names: list[str]) -> dict[str, Any]:
    """The JSON beside the tensors: which token of which model, the ids that reproduce the step, each tensor."""
    return {
        "model": model,
        "fingerprint": fingerprint,
        "index": record.index,
        "position": record.position,
        "token_id": record.token_id,
        "text": text,
        "prob": record.prob,
        "forced": record.forced,
        "input_ids": input_ids,
        "tensors": {name: DESCRIPTIONS[name] for name in names},
    }
