"""`research-loop`: the project's commands beside the MCP server.

    uv run research-loop overnight --tag nov26 --hours 8    # unattended Claude Code sessions until a limit
    uv run research-loop dashboard --workspace DIR          # the dashboard, read-only, with no MCP server
    uv run research-loop report --workspace DIR [--branch pr/nov26]   # the morning report (and a PR branch)
"""
import argparse
import os
import sys
from pathlib import Path

import git

from mcp_server.dashboard import dashboard_http
from mcp_server.phases import morning
from mcp_server.overnight import overnight
from mcp_server.core.models import Refusal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="research-loop", allow_abbrev=False, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    overnight.add_arguments(commands.add_parser(
        "overnight", allow_abbrev=False, help="run headless Claude Code sessions one after another until the "
                                               "research run's stop condition"))
    dashboard_http.add_arguments(commands.add_parser(
        "dashboard", allow_abbrev=False, help="serve the dashboard of a workspace on 127.0.0.1, read-only, with "
                                               "no MCP server (the morning after)"))
    morning = commands.add_parser("report", allow_abbrev=False, help="write the research run's report (Markdown, "
                                                                      "under .research-loop/reports/) from its records")
    morning.add_argument("--workspace", type=Path, default=os.environ.get("RESEARCH_LOOP_WORKSPACE") or os.getcwd(),
                         help="the research run's workspace (default: env RESEARCH_LOOP_WORKSPACE, else here)")
    morning.add_argument("--branch", help="also make this new branch: one commit per kept change on the research "
                                          "run's starting point, for a pull request (never main, master or an "
                                          "existing branch)")
    args = parser.parse_args(argv)
    return {"overnight": overnight.main, "dashboard": dashboard_http.main, "report": write_report}[args.command](args)


def write_report(args) -> int:
    try:
        made = morning.write(args.workspace, args.branch)
    except Refusal as exc:
        print(f"research-loop report: {exc}", file=sys.stderr)
        return 1
    except git.GitCommandError as exc:
        print(f"research-loop report: git failed: {(exc.stderr or str(exc)).strip()}", file=sys.stderr)
        return 1
    print(f"report: {made.path}")
    if made.branch:
        print(f"branch {made.branch}: {len(made.commits)} commit(s) ({', '.join(made.commits)}), one per kept change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
