"""Chat and serve: an exported GGUF as a streaming terminal chat and as a local OpenAI-compatible
endpoint, both with the chat template and stop tokens the model was trained and verified with.

`model` finds the file and its contract, `chat` holds a conversation (a generator of text chunks
that the CLI and the TUI consume), `server` wraps llama-cpp-python's OpenAI server with the
limits and checks a shared machine needs, and `audit` writes one JSON line per request.
"""
