"""The README's two commands are the project's contract; .ci/run must run the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim():
    train_cmd, test_cmd = readme_commands()
    assert "minideep train" in train_cmd and "pytest" in test_cmd
    ci_lines = [l.strip() for l in ROOT.joinpath(".ci", "run").read_text().splitlines()]
    assert test_cmd in ci_lines
