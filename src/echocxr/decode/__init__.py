"""Decoding engines: AR, multi-step block diffusion, one-step (vanilla and fused KV cache)."""
