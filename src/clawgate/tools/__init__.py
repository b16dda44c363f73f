"""Tools offered to agents: the session tools and MCP tool servers."""
