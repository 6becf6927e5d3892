"""Model: the Qwen2.5-VL-compatible VLM with our own attention masks, KV cache and decode step."""
