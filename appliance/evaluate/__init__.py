"""Evaluate: score each target (base, few-shot, tuned, each quantization) on the test split."""
