"""bench/run.py, the benchmark suite: every row of the table is printed, measured or "not run"
with its reason (a missing script, a failing one, one that times out or writes no rows), and
suite.json holds the same rows. The scripts here are stand-ins written to a temporary bench
directory; the real ones are run by ``make bench``."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    run = importlib.import_module("run")
    monkeypatch.setattr(run, "HERE", tmp_path)
    return run


def script(directory: Path, name: str, body: str) -> None:
    (directory / name).write_text(textwrap.dedent(body))


GOOD = """
    import json, sys
    path = sys.argv[sys.argv.index("--json") + 1]
    rows = [{"key": "fused_step", "row": "fused step, 4 replay experts",
             "baseline": "p50 0.300 ms", "target": "p50 ≤ 1.5×",
             "measured": "p50 0.420 ms = 1.40×", "passed": True, "note": ""}]
    json.dump({"suite_rows": rows, "quick": "--quick" in sys.argv}, open(path, "w"))
"""


def test_every_row_is_printed_measured_or_not_run_with_its_reason(
    suite: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script(tmp_path, "good.py", GOOD)
    script(tmp_path, "fails.py", "import sys\nprint('no model here')\nsys.exit(3)\n")
    script(tmp_path, "silent.py", "import json, sys\njson.dump({}, open(sys.argv[2], 'w'))\n")
    script(tmp_path, "slow.py", "import time\ntime.sleep(30)\n")
    scripts = (
        suite.Script("good.py", ("fused_step",)),
        suite.Script("missing.py", ("sessions_64", "batching_16")),
        suite.Script("fails.py", ("backend_step",)),
        suite.Script("silent.py", ("two_experts",)),
        suite.Script("slow.py", ("gating",), quick_timeout_s=1),
    )
    monkeypatch.setattr(suite, "SCRIPTS", scripts)
    keys = "fused_step,sessions_64,batching_16,backend_step,two_experts,gating"
    assert suite.main(["--quick", "--only", keys, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")][2:]  # past the header
    assert len(lines) == 6
    assert lines[0].endswith("| p50 0.420 ms = 1.40× | PASS |")
    assert "not run: bench/missing.py does not exist yet | not run |" in lines[1]
    assert "not run: bench/missing.py does not exist yet | not run |" in lines[2]
    assert "not run: exited with 3: no model here | not run |" in lines[3]
    assert "not run: its JSON has no 'suite_rows' | not run |" in lines[4]
    assert "not run: timed out after 1 s" in lines[5]

    saved = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert [r["result"] for r in saved["rows"]] == ["PASS"] + ["not run"] * 5
    assert json.loads((tmp_path / "out" / "good.json").read_text())["quick"] is True


def test_an_unknown_row_is_refused(suite: ModuleType) -> None:
    with pytest.raises(SystemExit):
        suite.parse(["--only", "fused_step,nonsense"])


def test_a_miss_is_printed_as_a_miss(
    suite: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    script(tmp_path, "miss.py", GOOD.replace('"passed": True', '"passed": False'))
    monkeypatch.setattr(suite, "SCRIPTS", (suite.Script("miss.py", ("fused_step",)),))
    suite.main(["--only", "fused_step", "--out", str(tmp_path / "out")])
    assert "| p50 0.420 ms = 1.40× | **MISS** |" in capsys.readouterr().out


def teardown_module() -> None:
    sys.modules.pop("run", None)  # bench/run.py is not a package module
