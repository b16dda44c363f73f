"""The agent loop: provider call, streaming, tool calls."""
