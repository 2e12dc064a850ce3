"""The node and MCP: its skills as MCP tools (`node.mcp.server`), and MCP servers' tools for its
skills' models (`node.mcp.tools`)."""
