"""Unit 3: byte-level BPE (training, encoding, streaming, special tokens, a fast trainer)."""
