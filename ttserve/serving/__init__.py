"""The OpenAI-compatible HTTP server: wire protocol (protocol.py) kept apart from serving logic."""
