"""Fixtures of the server tests."""

from __future__ import annotations

import pytest
from security_support import security_server as _security_server


@pytest.fixture(scope="session")
def security_server(tmp_path_factory, data_dir):
    """One attacked server for both security test files (test_security.py, then test_security_round_two.py)."""
    yield from _security_server(tmp_path_factory, data_dir)
