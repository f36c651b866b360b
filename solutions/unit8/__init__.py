"""Unit 8: learning from preferences: sequence log-probs, the DPO loss family, and GRPO."""
