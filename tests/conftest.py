"""Shared fixtures: tiny random-weight models saved like real ones, and the real SmolLM2 for slow tests.

The tiny models go through the real loading code (``load_model(folder)``), so
tests exercise what users run. Their byte-level BPE tokenizer is trained here
on a few sentences (no downloads); it knows multi-byte characters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "Hello world, hello kvtrace! Tell me a story about a small robot.",
    "Café, naïve, déjà vu; 日本語のテキスト; emoji 🙂🚀 and math ∑ π ≈ 3.14159.",
    "def step(self): return self.model(input_ids, past_key_values=cache)",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB = 384


def build_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        bos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny(folder: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory: pytest.TempPathFactory):
    """Tests, and every kvtrace they start, get their own default snapshot store ($XDG_DATA_HOME/kvtrace/store)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 KV heads) and a ChatML template."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CHATML)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=None, tie_word_embeddings=False,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 (absolute positions, tied head) without a chat template."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer(None)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel(config), tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (from the user's GGUF cache)."""
    from tracer.loading import load_model

    return load_model(None, device="cpu")
