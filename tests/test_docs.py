import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from make_cli_reference import REFERENCE, reference  # noqa: E402


def test_the_cli_reference_matches_the_commands_help():
    assert REFERENCE.read_text() == reference(), (
        "docs/cli.md is out of date: run python scripts/make_cli_reference.py"
    )


def test_the_readme_opens_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert f"```\n{test_command}\n```" in readme
    assert "txagg demo" in readme.split("##")[0]


def test_the_code_is_tidy():
    import subprocess

    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
