"""Reinforcement learning and supervision: the DiG reward, GRPO, the supervised warm-up, the curriculum."""
