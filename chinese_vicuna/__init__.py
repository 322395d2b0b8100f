"""Shared building blocks of the Chinese-Vicuna toolkit: prompts, data, models, training, generation."""

__version__ = "0.1.0"
