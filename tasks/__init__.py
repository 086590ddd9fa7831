"""Benchmarks: data, prompts, answer extraction and metrics. No torch here."""
