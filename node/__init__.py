"""A2A network node whose LLM agents keep their KV caches across tasks, restarts and sessions."""

__version__ = "0.1.0"
