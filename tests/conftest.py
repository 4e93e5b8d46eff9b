"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real card transactions live beside the repo, never inside it.  CI has
# them; a developer machine may not, and then real-data tests skip.
_DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "transactions-2018-04-to-07.parquet"
)


def _data_file() -> Path:
    return Path(os.environ.get("MUSE_DATA", _DEFAULT_DATA))


@pytest.fixture(scope="session")
def data_path() -> Path:
    """Path of the shared transactions file; skips the test where it is absent."""
    path = _data_file()
    if not path.is_file():
        pytest.skip(f"real transaction data not found at {path} (set MUSE_DATA)")
    return path
