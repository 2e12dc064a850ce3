"""The Anthropic Messages API on the node's agents: request parsing, prompts, responses, errors."""
