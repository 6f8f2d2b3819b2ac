"""`research-loop`: the project's commands beside the MCP server.

    uv run research-loop overnight --tag nov26 --hours 8    # unattended Claude Code sessions until a limit
    uv run research-loop dashboard --workspace DIR          # the dashboard, read-only, with no MCP server
"""
import argparse
import sys

from mcp_server.dashboard import dashboard_http
from mcp_server.overnight import overnight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="research-loop", allow_abbrev=False, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    overnight.add_arguments(commands.add_parser(
        "overnight", allow_abbrev=False, help="run headless Claude Code sessions one after another until the "
                                               "research run's stop condition"))
    dashboard_http.add_arguments(commands.add_parser(
        "dashboard", allow_abbrev=False, help="serve the dashboard of a workspace on 127.0.0.1, read-only, with "
                                               "no MCP server (the morning after)"))
    args = parser.parse_args(argv)
    return {"overnight": overnight.main, "dashboard": dashboard_http.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
