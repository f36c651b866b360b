"""Unit 2: attention (scaled dot-product, multi-head with grouped queries, RoPE, blockwise with an online softmax)."""
