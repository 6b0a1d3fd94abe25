"""ttserve: an adaptive LLM inference server that learns at test time."""

__version__ = "0.1.0"
