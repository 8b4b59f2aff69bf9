import pytest

from harness import cache


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))


def test_fingerprint_ignores_key_order_and_sees_values():
    assert cache.fingerprint({"a": 1, "b": 2}) == cache.fingerprint({"b": 2, "a": 1})
    assert cache.fingerprint({"a": 1}) != cache.fingerprint({"a": 2})


def test_build_is_atomic_and_lookup_finds_finished_artefacts():
    assert cache.lookup("model", "k1") is None
    with pytest.raises(RuntimeError):
        with cache.build("model", "k1") as d:
            (d / "w.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert cache.lookup("model", "k1") is None
    with cache.build("model", "k1", {"why": "test"}) as d:
        (d / "w.txt").write_text("done")
    path = cache.lookup("model", "k1")
    assert path is not None and (path / "w.txt").read_text() == "done"
