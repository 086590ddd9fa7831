"""nsa-eval: evaluation harness for Native Sparse Attention and full-attention language models."""

__version__ = "0.1.0"
