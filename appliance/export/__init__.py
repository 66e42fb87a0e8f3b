"""Export: merge the adapter, convert to GGUF, quantize, verify every file, sign the manifest."""
