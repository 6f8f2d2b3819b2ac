"""The dashboard: read-only views of a workspace (dashboard.py), served on 127.0.0.1 with server-sent
events (dashboard_http.py, the page in dashboard_static/), and the HTTP token it shares with the
MCP server's --http transport (auth.py).

Imports from the package: scripts, core, phases.
"""
