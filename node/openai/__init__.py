"""The OpenAI Chat Completions API on the node's agents, on the same caches as the Anthropic API."""
