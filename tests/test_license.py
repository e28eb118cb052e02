"""LICENSE is the Apache License 2.0 that pyproject.toml declares: our copyright line, then the text
exactly as published (http://www.apache.org/licenses/LICENSE-2.0.txt, also Debian's
/usr/share/common-licenses/Apache-2.0), which its SHA-256 pins."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_apache_2_text_pyproject_declares():
    assert '\nlicense = "Apache-2.0"\n' in (ROOT / "pyproject.toml").read_text()
    copyright_line, text = (ROOT / "LICENSE").read_text().split("\n", 1)
    assert copyright_line == "Copyright 2026 The vpt-serve authors"
    assert hashlib.sha256(text.encode()).hexdigest() == APACHE_2_SHA256
