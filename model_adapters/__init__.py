"""Checkpoints -> the request-level LanguageModel interface (model_adapters.base)."""
