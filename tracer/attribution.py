"""Direct logit attribution: what each layer added to a token's logit at one step.

The stream entering the final norm is the sum of what came before the first
layer (the embedding) and what each layer added; the attention block's part
of a layer is captured (``tracer.residual``), the rest of the layer is its MLP.
The final norm is not linear, but with its scale frozen at the value it took
at this position (the usual linear approximation) it maps each part on its
own, and the output head is linear: so every part gets a share of the logit,
and the shares add up to the model's logit exactly (up to float rounding).
What the approximation leaves out is that a part, removed, would also have
changed the scale.

Logits are taken relative to their mean over the vocabulary (adding the same
amount to every logit changes no probability). A final logit softcap (Gemma 2)
is left out: the attribution explains the logit before it.

The norm is applied as the model's own module (any weight convention, any
epsilon): a part scaled to the stream's own spread gets the stream's scale
exactly. Norms that are neither RMS- nor layer-norm-like are detected (the
parts must add up to the normalized stream) and skipped.
"""

from __future__ import annotations

import copy

import torch

from tracer.lens import LogitLens
from tracer.records import Attribution
from tracer.residual import StepTensors

TOLERANCE = 1e-3  # the parts must rebuild the normalized stream this closely (relative), else the norm is not
# of a kind this attribution understands


class Attributor:
    """The attribution of one model: a float32 copy of its final norm, and its output head's weights."""

    def __init__(self, lens: LogitLens) -> None:
        self._lens = lens
        self._norm = copy.deepcopy(lens.norm).float()
        self._weight = lens.head.weight  # (vocab, d)
        bias = getattr(lens.head, "bias", None)
        self._bias = None if bias is None else bias.detach().float()
        self._mean_row: torch.Tensor | None = None  # the head's mean row: the mean logit's direction
        self._centered: bool | None = None  # layer-norm-like: constant inputs normalize to the bias

    def _normalize(self, rows: torch.Tensor) -> torch.Tensor:
        return self._norm(rows.to(self._lens.norm_device).float()).float()

    def _is_centered(self, width: int) -> bool:
        if self._centered is None:
            zero, flat = self._normalize(torch.zeros(2, width) + torch.tensor([[0.0], [3.0]]))
            self._centered = bool(torch.allclose(zero, flat, atol=1e-4))
        return self._centered

    def _spread(self, rows: torch.Tensor, centered: bool) -> torch.Tensor:
        if centered:
            rows = rows - rows.mean(-1, keepdim=True)
        return rows.pow(2).mean(-1)

    def parts(self, parts: torch.Tensor, stream: torch.Tensor, whole: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``parts`` (n, d), the first ``whole`` of which sum to ``stream`` (d), through the final norm with the
        stream's scale: the normalized parts, the norm's bias, and how far the normalized first ``whole``
        parts and the bias lie from the normalized stream (relative)."""
        parts, stream = parts.to(self._lens.norm_device).float(), stream.to(self._lens.norm_device).float()
        centered = self._is_centered(stream.shape[-1])
        spread = self._spread(parts, centered)
        scale = torch.where(spread > 0, (self._spread(stream, centered) / spread.clamp_min(1e-30)).sqrt(),
                            torch.ones_like(spread))
        bias = self._normalize(torch.zeros_like(stream)[None])[0]
        normalized = (self._normalize(parts * scale[:, None]) - bias) / scale[:, None]
        normalized = torch.where((spread > 0)[:, None], normalized, torch.zeros_like(normalized))
        target = self._normalize(stream[None])[0]
        miss = float((normalized[:whole].sum(0) + bias - target).norm() / target.norm().clamp_min(1e-30))
        return normalized, bias, miss

    def _direction(self, token_id: int) -> torch.Tensor:
        if self._mean_row is None:
            self._mean_row = self._weight.float().mean(0)
        return (self._weight[token_id].float() - self._mean_row).to(self._lens.norm_device)

    @torch.no_grad()
    def attribute(self, tensors: StepTensors, token_id: int) -> Attribution | None:
        """The attribution of ``token_id``'s logit at the step; None when the step lacks the stream's ends or
        the final norm is not one it understands."""
        if not tensors.complete:
            return None
        stream = tensors.stream()  # (layers + 1, d)
        layers = stream[1:] - stream[:-1]
        rows = [stream[:1], layers]
        if tensors.attention is not None:
            rows.append(tensors.attention.to(stream.device))
        normalized, bias, miss = self.parts(torch.cat(rows), stream[-1], 1 + layers.shape[0])
        if miss > TOLERANCE:
            return None
        direction = self._direction(token_id)
        shares = (normalized @ direction).cpu()
        count = layers.shape[0]
        bias_share = float(bias @ direction)
        if self._bias is not None:
            bias_share += float(self._bias[token_id] - self._bias.mean())
        logits = self._lens.logits(stream[-1][None], softcap=False)[0]
        total = float(logits[token_id] - logits.mean())
        embedding, per_layer = float(shares[0]), shares[1 : 1 + count]
        attention = shares[1 + count :] if tensors.attention is not None else None
        explained = embedding + float(per_layer.sum()) + bias_share
        return Attribution(token_id=token_id, embedding=embedding, layers=per_layer.numpy(),
                           attention=None if attention is None else attention.numpy(), bias=bias_share,
                           total=total, error=total - explained)
