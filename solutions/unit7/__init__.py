"""Unit 7: a GPT of your own (Llama-style), trained by your own loop, on a corpus whose best possible loss is known."""
