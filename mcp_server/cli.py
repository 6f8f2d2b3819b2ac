"""`research-loop`: the project's commands beside the MCP server.

    uv run research-loop overnight --tag nov26 --hours 8    # unattended Claude Code sessions until a limit
"""
import argparse
import sys

from mcp_server import overnight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="research-loop", allow_abbrev=False, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    overnight.add_arguments(commands.add_parser(
        "overnight", allow_abbrev=False, help="run headless Claude Code sessions one after another until the "
                                               "research run's stop condition"))
    args = parser.parse_args(argv)
    return {"overnight": overnight.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
