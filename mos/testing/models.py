"""Tiny real transformers models built from configs (no download), token batches, and random pools
for an adapter under test, all seeded."""
from __future__ import annotations

import torch

__all__ = ["tiny_llama", "tiny_gpt2", "token_batch", "randomize_pools", "TINY_VOCAB", "LLAMA_CONFIG", "GPT2_CONFIG"]

TINY_VOCAB = 128
LLAMA_CONFIG = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
GPT2_CONFIG = dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def _build(model_class, config, seed, device, dtype):
    torch.manual_seed(seed)
    return model_class(config).to(device=device, dtype=dtype).eval()


def tiny_llama(seed: int = 0, device="cpu", dtype=torch.float32, **config_overrides):
    """A LlamaForCausalLM (2 layers, hidden 32, 4 heads, 2 KV heads, vocab 128) in eval mode;
    the same seed and overrides give the same weights."""
    import transformers

    config = transformers.LlamaConfig(**{**LLAMA_CONFIG, **config_overrides})
    return _build(transformers.LlamaForCausalLM, config, seed, device, dtype)


def tiny_gpt2(seed: int = 0, device="cpu", dtype=torch.float32, **config_overrides):
    """A GPT2LMHeadModel (2 layers, width 32, 4 heads, vocab 128) in eval mode, seeded like tiny_llama."""
    import transformers

    config = transformers.GPT2Config(**{**GPT2_CONFIG, **config_overrides})
    return _build(transformers.GPT2LMHeadModel, config, seed, device, dtype)


def token_batch(batch: int = 2, seq: int = 8, vocab_size: int = TINY_VOCAB, seed: int = 1, device="cpu"):
    """(batch, seq) int64 token ids drawn uniformly from [0, vocab_size) by a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g).to(device)


def randomize_pools(model, seed: int = 3, scale: float = 0.2):
    """Gives every pool of every adapter of a MoSModel seeded nonzero values (a fresh adapter's
    B-pool is zero, so its outputs would not show the adapter at all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.mos_pools.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype) * scale)
