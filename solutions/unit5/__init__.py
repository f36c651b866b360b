"""Unit 5: LoRA (low-rank adapters that match peft, merge and unmerge, and fine-tune a small GPT)."""
