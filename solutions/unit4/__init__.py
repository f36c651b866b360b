"""Unit 4: the KV-cache (incremental decoding that matches the full model, and is fast)."""
