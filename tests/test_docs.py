"""The docs agree with the code: every variable the settings read is in the configuration
reference, and docs/serve.md states the backoff that jobs/backoff.py implements."""

from __future__ import annotations

import re
from pathlib import Path

from jobs import backoff

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_variable_the_code_reads_is_documented() -> None:
    source = (ROOT / "jobs" / "config.py").read_text()
    read = set(re.findall(r"env(?:\.get\(|\[)\"([A-Z][A-Z0-9_]+)\"", source))
    assert {"JOBS_DATABASE_URL", "FAL_KEY", "JOBS_API_TOKEN"} <= read
    reference = (DOCS / "reference" / "configuration.md").read_text()
    missing = sorted(name for name in read if f"`{name}`" not in reference)
    assert not missing, f"add to docs/reference/configuration.md: {missing}"


def test_serve_md_states_the_backoff_in_the_code() -> None:
    text = (DOCS / "serve.md").read_text()
    stated = f"{backoff.INITIAL:g} s, ×{backoff.FACTOR:g}, ceiling {backoff.CEILING:g} s"
    assert stated in text
    assert "×1.6" not in text and "ceiling 30 s" not in text
