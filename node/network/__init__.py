"""The node's place in a network: registry, membership, peer discovery and delegation."""
