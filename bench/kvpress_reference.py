"""The reference side of bench/pruning.py: kvpress's presses on the same tokens, in kvpress's own venv.

kvpress 0.5.5 needs transformers >=5.2,<5.3, so it never shares the project's
environment: bench/pruning.py runs this script with ``--kvpress-python``
(e.g. a venv made with ``pip install torch==2.13.0 "kvpress==0.5.5"``) and
reads one JSON object from stdout. The protocol is the one kvtrace's own side
uses: the context's last token is pending, every other context token is
prefilled (the press compresses during that prefill to exactly ``kept``
entries), then the pending token and the continuation are fed at their true
positions and the continuation's perplexity is measured (teacher forcing).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

PRESSES = {
    "streaming_llm": ("StreamingLLMPress", "eager"),
    "h2o": ("ObservedAttentionPress", "eager"),
    "expected_attention": ("ExpectedAttentionPress", "sdpa"),
    "tova": ("TOVAPress", "eager"),
    "snapkv": ("SnapKVPress", "sdpa"),
    "knorm": ("KnormPress", "sdpa"),
}


def perplexity(model, context: list[int], continuation: list[int], press) -> tuple[float, int]:
    """Perplexity of ``continuation`` after prefilling ``context[:-1]`` under ``press``; and the entries kept."""
    from transformers import DynamicCache

    cache = DynamicCache()
    prefix = torch.tensor([context[:-1]])
    with torch.no_grad():
        if press is None:
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(input_ids=prefix, past_key_values=cache, use_cache=True)
        kept = cache.layers[0].keys.shape[2]
        feed = [context[-1], *continuation[:-1]]
        start = len(context) - 1
        out = model(input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(start, start + len(feed)).unsqueeze(0))
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), torch.tensor(continuation))
    return math.exp(float(nll)), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--tokens", required=True, help="JSON file: {texts: {name: {context, continuation}}}")
    parser.add_argument("--kept", type=int, nargs="+", required=True, help="entries to keep")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    args = parser.parse_args()

    import kvpress
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    torch.set_grad_enabled(False)
    with open(args.tokens, encoding="utf-8") as f:
        texts = json.load(f)["texts"]
    results: dict = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "?", "texts": {}}
    for implementation in sorted({attn for _, attn in PRESSES.values()}):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=implementation)
        model.eval()
        for name, tokens in texts.items():
            table = results["texts"].setdefault(name, {})
            context, continuation = tokens["context"], tokens["continuation"]
            if implementation == "sdpa":
                table["full"] = perplexity(model, context, continuation, None)[0]
            for press_name in args.presses:
                class_name, wanted = PRESSES[press_name]
                if wanted != implementation:
                    continue
                for kept in args.kept:
                    ratio = 1 - (kept + 0.5) / (len(context) - 1)  # ScorerPress keeps int(n * (1 - ratio))
                    press = getattr(kvpress, class_name)(compression_ratio=ratio)
                    value, entries = perplexity(model, context, continuation, press)
                    table.setdefault(press_name, {})[str(kept)] = {"perplexity": value, "entries": entries}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
