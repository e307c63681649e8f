"""The public Python API: ``txagg.__all__``, its documentation in docs/python.md, the examples
there (run against a real mock upstream), and the cost of ``import txagg``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import txagg
from txagg.models import loads
from txagg.testing import ground_truth, txagg_command

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "python.md"
DOCUMENTED_URL = "http://127.0.0.1:8000"
HEAVY = ("httpx", "pydantic", "typer", "uvicorn", "granian", "starlette", "rich")


def run_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=180
    )


def loaded_after(statements: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running ``statements``."""
    code = f"import sys\n{statements}\nimport json\n"
    code += f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def documented_names() -> list[str]:
    section = GUIDE.read_text().split("## The public names", 1)[1]
    return re.findall(r"^- `([A-Za-z_]+)`:", section, flags=re.MULTILINE)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_every_public_name_exists():
    assert len(txagg.__all__) == len(set(txagg.__all__))
    missing = [name for name in txagg.__all__ if not hasattr(txagg, name)]
    assert missing == []
    assert txagg.__version__ == "0.1.0"
    assert set(txagg.__all__) <= set(dir(txagg))


def test_every_public_name_is_documented_in_docs_python_md_and_only_those():
    names = documented_names()
    assert sorted(names) == sorted(txagg.__all__)


def test_the_exceptions_are_the_ones_the_core_raises():
    from txagg import errors

    for name in txagg.__all__:
        value = getattr(txagg, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert value is getattr(errors, name)
    assert issubclass(txagg.StoreError, txagg.TxaggError)
    assert issubclass(txagg.SyncLocked, txagg.StoreError)


def test_import_txagg_is_cheap():
    """The report fast path and scripts that only read must not pay for the heavy imports."""
    assert loaded_after("import txagg") == []
    reading = (
        "import txagg\n"
        "txagg.Store, txagg.default_db_path, txagg.SyncOptions, txagg.SyncSummary\n"
        "txagg.user_report, txagg.payouts_report, txagg.status_report, txagg.parse_time\n"
        "txagg.dumps, txagg.TxaggError"
    )
    assert loaded_after(reading) == []


def test_syncing_never_imports_the_command_line_or_the_servers():
    loaded = loaded_after("import txagg\ntxagg.sync_store, txagg.verify_store, txagg.VerifyReport")
    assert "httpx" in loaded  # sync reads the upstream with it
    assert not {"typer", "pydantic", "uvicorn", "granian", "starlette"} & set(loaded)


def test_the_modules_stay_modules_and_the_functions_have_names_of_their_own():
    """``txagg.sync`` and ``txagg.verify`` are modules, as Python imports expect, whatever was
    imported first; the functions are ``sync_store`` and ``verify_store``."""
    for first in ("import txagg.cli, txagg.testing", "from txagg.sync import Syncer", "pass"):
        result = run_python(
            f"{first}\n"
            "import sys, types, txagg\n"
            "import txagg.sync as sync_module, txagg.verify as verify_module\n"
            "assert isinstance(sync_module, types.ModuleType)\n"
            "assert isinstance(verify_module, types.ModuleType)\n"
            "assert txagg.sync_store is sync_module.sync\n"
            "assert txagg.verify_store is verify_module.verify\n"
        )
        assert result.returncode == 0, (first, result.stderr)


def test_the_examples_in_docs_python_md_run_against_a_mock(mock_process, tmp_path: Path):
    """All python blocks of the guide, in order, as one script, against a real mock-serve: the
    guide cannot drift from the API."""
    blocks = python_blocks()
    assert len(blocks) >= 3
    script = "\n".join(blocks)
    assert DOCUMENTED_URL in script
    mock = mock_process()
    (tmp_path / "example.py").write_text(script.replace(DOCUMENTED_URL, mock.url))

    result = subprocess.run(
        [sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    truth = ground_truth(mock.url)
    history = sum(item["transactions"] for item in truth)
    assert lines[0].startswith(f"{history} new transactions, complete up to ")

    printed = next(line for line in lines if line.startswith("{"))
    report = loads(printed)
    expected = next(item for item in truth if item["userId"] == report["userId"])
    assert {**report, "asOf": None} == {**expected, "asOf": None}
    assert "no such user: nobody" in lines
    assert "another process" not in result.stdout and "sync failed" not in result.stdout

    # "the JSON of `txagg report USER --json`, byte for byte" (for the store as it is now: the
    # guide's last example syncs again, which moves asOf on)
    command = subprocess.run(
        txagg_command("report", report["userId"], "--json", "--db", str(tmp_path / "txagg.db")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert command.returncode == 0, command.stderr
    with txagg.Store.open(tmp_path / "txagg.db", create=False, read_only=True) as store:
        now = txagg.dumps(txagg.user_report(store, report["userId"]))
    assert command.stdout == now + "\n"
    assert {**loads(now), "asOf": None} == {**report, "asOf": None}
