"""Unit 1: backpropagation (a scalar autograd engine, NumPy layers, a fused autograd Function)."""
