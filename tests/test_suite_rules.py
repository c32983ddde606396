"""The test suite's own rules: missing shared data skips a local run but fails CI."""

from __future__ import annotations

import pytest

from tests.conftest import require_data


def test_missing_shared_data_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    missing = tmp_path / "shared" / "data"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared data not found"):
        require_data(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_data(missing)
    assert require_data(tmp_path) == tmp_path
