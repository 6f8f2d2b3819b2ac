"""The README's two newcomer commands stay true: CI runs the same test command, and demo.py exists."""
import re


def newcomer_commands(repo_root) -> list[str]:
    readme = (repo_root / "README.md").read_text()
    try_it = readme.split("## Try it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", try_it, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_gives_exactly_the_main_job_and_the_tests(repo_root):
    assert newcomer_commands(repo_root) == ["uv run demo.py", "uv run pytest"]
    assert (repo_root / "demo.py").is_file()


def test_ci_runs_the_readme_test_command(repo_root):
    ci = (repo_root / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == newcomer_commands(repo_root)[1]
