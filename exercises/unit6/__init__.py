"""Unit 6: PPO with clipping, GAE, value clipping and KL-shaped rewards for RLHF."""
