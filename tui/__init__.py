"""The Textual terminal UI of the appliance. Never imports torch, transformers, unsloth or llama_cpp."""
