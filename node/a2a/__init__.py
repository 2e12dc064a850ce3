"""A2A protocol adapter: cards, skill executors, request handling and task stores on a2a-sdk."""
