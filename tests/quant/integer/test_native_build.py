"""The fused kernels' build: used when it succeeds, skipped on request, a named fallback when it fails."""

from __future__ import annotations

import pytest

from fqvit_pl.quant.integer import native


@pytest.fixture
def fresh_build_state():
    """Forget the cached build before and after (the next user loads the real one again)."""
    native.native_ops.cache_clear()
    yield
    native.native_ops.cache_clear()


def test_fqvit_native_0_skips_the_build(monkeypatch, fresh_build_state) -> None:
    monkeypatch.setenv("FQVIT_NATIVE", "0")
    assert native.native_ops() is None
    assert not native.native_available()


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path, fresh_build_state) -> None:
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv("FQVIT_NATIVE", "1")
    with pytest.warns(UserWarning, match="could not be built"):
        assert native.native_ops() is None


def test_the_build_name_changes_with_the_sources(tmp_path) -> None:
    source = tmp_path / "kernel.cpp"
    source.write_text("// one\n")
    first = native._build_name([source])
    source.write_text("// two\n")
    assert native._build_name([source]) != first
    assert first.startswith("fqvit_native_")
