"""appliance: offline fine-tuning of open LLMs, from private data to a verified local model."""

__version__ = "0.1.0"
