"""Token data tests: each test has its own decoded-token cache."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decompresses SeiT streams into its own cache folder."""
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"
