"""Shows build/arm64/report.md (x86 vs emulated arm64) at the end of a run of arm64_parity.py, before pytest's
closing line. Any other run (e.g. `make test`, which never collects arm64_parity.py) prints nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REPORT_PATH = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def arm64_report_path(request: pytest.FixtureRequest) -> Path:
    path = Path(os.environ.get("ARM64_BUILD_DIR", REPO / "build" / "arm64")) / "report.md"
    path.unlink(missing_ok=True)  # only this run's measurements
    request.config.stash[REPORT_PATH] = path
    return path


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    path = config.stash.get(REPORT_PATH, None)
    if path is None or not path.is_file():
        return
    terminalreporter.write_sep("-", f"measurements ({path})")
    for line in path.read_text().splitlines():
        terminalreporter.write_line(line)
