"""mintd: many LoRA adapter policies trained and served over a few resident base models."""

__version__ = "0.1.0"
