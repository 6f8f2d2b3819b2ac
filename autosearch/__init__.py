"""A search agent over train.py's constants that drives the research loop through the MCP server."""
