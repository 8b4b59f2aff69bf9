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


def test_a_cached_file_overwritten_with_as_many_bytes_is_not_served(capsys):
    with cache.build("model", "k2", {"why": "test"}) as d:
        (d / "w.bin").write_bytes(b"weights!")
    path = cache.lookup("model", "k2")
    (path / "w.bin").write_bytes(b"WEIGHTS!")  # same size, other content: only its sha256 tells
    assert cache.lookup("model", "k2") is None
    assert "w.bin differs from what its build wrote (sha256)" in capsys.readouterr().err


def test_a_damaged_entry_is_removed_only_by_its_rebuild_under_the_keys_lock(capsys):
    """A job that finds an entry damaged leaves it to the job that rebuilds it (which holds the key's lock): a
    reader that removed it could remove it under another job checking it, or remove that job's fresh rebuild."""
    with cache.build("model", "k15") as d:
        (d / "w.bin").write_bytes(b"weights!")
    path = cache.lookup("model", "k15")
    (path / "w.bin").write_bytes(b"WEIGHTS!")
    assert cache.lookup("model", "k15") is None and (path / "w.bin").read_bytes() == b"WEIGHTS!"

    def make():
        with cache.build("model", "k15") as d:
            (d / "w.bin").write_bytes(b"rebuilt!")

    assert (cache.ensure("model", "k15", make) / "w.bin").read_bytes() == b"rebuilt!"
    assert capsys.readouterr().err.count("cache entry model/k15 is damaged") == 1  # not once per look
    assert not cache.unfinished()


def test_an_entry_removed_while_a_job_checks_it_is_not_served_and_raises_nothing(monkeypatch):
    import shutil

    with cache.build("model", "k16") as d:
        (d / "w.bin").write_bytes(b"weights!")
    path = cache.cache_root() / "model" / "k16"
    (path / "w.bin").write_bytes(b"WEIGHTS!")  # damaged, so another job rebuilds it: it removes it meanwhile
    real = cache.file_sha256

    def removed_meanwhile(f):
        shutil.rmtree(path)
        return real(f)

    monkeypatch.setattr(cache, "file_sha256", removed_meanwhile)
    assert cache.lookup("model", "k16") is None


def test_two_processes_ensuring_one_artefact_build_it_once(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ensure_slowly, args=(tmp_path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "builds").read_text() == "built\n"  # the second found the first's
    assert (cache.lookup("kind", "key") / "x").read_text() == "x"


def _ensure_slowly(tmp_path):
    import time

    def make():
        with open(tmp_path / "builds", "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to be waiting on the lock
        with cache.build("kind", "key") as d:
            (d / "x").write_text("x")

    cache.ensure("kind", "key", make)


def test_a_build_clears_scratch_of_killed_builds_of_its_key_and_keeps_live_or_foreign_ones():
    import os
    import subprocess
    import sys

    host = cache.this_host()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root = cache.cache_root() / "model"
        scratch = {name: root / f"{cache.SCRATCH}{name}" for name in (
            f"k1-{host}-{finished.stdout.strip()}",  # killed (SIGKILL skips the cleanup)
            f"k1-{host}-{running.pid}",  # still building
            f"k1-other-node-7-{os.getpid()}",  # another host: cannot tell
            f"k2-{host}-{finished.stdout.strip()}")}  # another key: not this build's business
        for d in scratch.values():
            (d / "w.bin").parent.mkdir(parents=True)
            (d / "w.bin").write_bytes(b"x" * 1024)
        dead = int(finished.stdout)
        assert sorted((u["key"], u["host"], u["pid"], u["alive"]) for u in cache.unfinished()) == sorted([
            ("k1", host, dead, False), ("k1", host, running.pid, True), ("k1", "other-node-7", os.getpid(), None),
            ("k2", host, dead, False)])
        with cache.build("model", "k1") as d:
            (d / "w.txt").write_text("done")
        assert [d.exists() for d in scratch.values()] == [False, True, True, True]
        assert (cache.lookup("model", "k1") / "w.txt").read_text() == "done"
    finally:
        running.kill()


def test_a_build_finishing_after_another_process_built_the_key_keeps_theirs(capsys):
    """Between a check that the entry is absent and the rename, another builder can finish: the rename then
    fails (directory not empty), and their entry stands."""
    with cache.build("tokens", "k3") as d:
        (d / "mine").write_text("mine")
        with cache.build("tokens", "k3-theirs") as theirs:  # as another process would have, under our key
            (theirs / "theirs").write_text("theirs")
        (cache.cache_root() / "tokens" / "k3-theirs").rename(cache.cache_root() / "tokens" / "k3")
    assert (cache.cache_root() / "tokens" / "k3" / "theirs").is_file() and not cache.unfinished()
    assert "built by another process meanwhile" in capsys.readouterr().err


def test_an_interrupted_build_leaves_no_scratch_whatever_stopped_it():
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-build: the process may live on (a notebook, the runner)
        with cache.build("model", "k4") as d:
            (d / "w.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not cache.unfinished() and cache.lookup("model", "k4") is None


def test_a_scratch_directory_of_another_users_live_build_is_kept(monkeypatch):
    """Signal 0 to another user's process is refused (EPERM): that build is alive, and its files are kept."""
    import os

    scratch = cache.cache_root() / "model" / f"{cache.SCRATCH}k5-{cache.this_host()}-4242"
    scratch.mkdir(parents=True)

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    with cache.build("model", "k5") as d:
        (d / "w.txt").write_text("done")
    assert scratch.is_dir() and [u["alive"] for u in cache.unfinished()] == [True]


def test_a_leftover_directory_without_meta_is_rebuilt_over():
    """An entry whose removal was cut off after its meta.json went (`harness cache rm` or a damaged entry's
    removal, killed; a copy of the cache cut off) is never served, nor listed: building its key replaces it."""
    left = cache.cache_root() / "tokens" / "k6"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "tokens.bin").write_bytes(b"old")
    assert cache.lookup("tokens", "k6") is None and cache.entries() == []

    def make():
        with cache.build("tokens", "k6") as d:
            (d / "tokens.bin").write_bytes(b"new")

    path = cache.ensure("tokens", "k6", make)
    assert sorted(p.name for p in path.iterdir()) == [cache.META, "tokens.bin"]
    assert (path / "tokens.bin").read_bytes() == b"new" and not cache.unfinished()


def test_a_rename_that_fails_for_another_reason_is_an_error(monkeypatch):
    import os

    def replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        with cache.build("model", "k7") as d:
            (d / "w.txt").write_text("done")
    assert not cache.unfinished()


def test_a_files_hash_is_remembered_until_the_file_changes(tmp_path):
    f = tmp_path / "essays.json"
    f.write_text("one")
    first = cache.remembered_sha256(f)
    assert first == cache.file_sha256(f) and cache.remembered_sha256(f) == first
    import os

    before = f.stat().st_mtime_ns
    f.write_text("two")  # as many bytes: only the modification time tells (set apart: it may not have moved yet)
    os.utime(f, ns=(before + 10**9, before + 10**9))
    assert cache.remembered_sha256(f) == cache.file_sha256(f) != first


def test_a_source_version_sees_file_names_as_well_as_contents(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("x = 1\n")
    assert cache.source_version(tmp_path / "a.py") != cache.source_version(tmp_path / "b.py")


def test_a_build_clears_scratch_left_under_its_own_pid_by_an_earlier_process():
    """Pids come round again (in a container, soon): the earlier process's scratch is not this build's."""
    import os

    scratch = cache.cache_root() / "model" / f"{cache.SCRATCH}k8-{cache.this_host()}-{os.getpid()}"
    scratch.mkdir(parents=True)
    (scratch / "w.bin").write_bytes(b"left over")
    with cache.build("model", "k8") as d:
        (d / "w.txt").write_text("done")
    assert sorted(p.name for p in cache.lookup("model", "k8").iterdir()) == [cache.META, "w.txt"]


def test_the_cache_is_under_xdg_cache_home_else_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "harness"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "harness"


def test_an_entry_from_before_manifests_were_recorded_is_served():
    import json

    with cache.build("model", "k9") as d:
        (d / "w.txt").write_text("done")
    path = cache.lookup("model", "k9")
    meta = json.loads((path / cache.META).read_text())
    del meta["files"]
    (path / cache.META).write_text(json.dumps(meta))
    assert cache.lookup("model", "k9") == path


def test_a_maker_that_writes_nothing_is_an_error_naming_the_entry():
    with pytest.raises(RuntimeError, match="building cache entry model/k10 finished without writing it"):
        cache.ensure("model", "k10", lambda: None)


def test_a_scratch_directory_of_a_container_sharing_this_host_name_is_kept(monkeypatch):
    """Containers on one cache may share a host name but not their processes: a build in another pid namespace
    cannot be told dead by its pid here, so its files stay."""
    import os
    import subprocess
    import sys

    real_stat = os.stat

    def in_namespace(ino):
        def stat(path, *args, **kwargs):
            if str(path) == "/proc/self/ns/pid":
                return os.stat_result((0, ino, 0, 0, 0, 0, 0, 0, 0, 0))
            return real_stat(path, *args, **kwargs)
        return stat

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(os, "stat", in_namespace(1))
    scratch = cache.cache_root() / "model" / f"{cache.SCRATCH}k11-{cache.this_host()}-{gone.stdout.strip()}"
    scratch.mkdir(parents=True)  # a build in the other container: its pid means nothing here
    monkeypatch.setattr(os, "stat", in_namespace(2))
    with cache.build("model", "k11") as d:
        (d / "w.txt").write_text("done")
    assert scratch.is_dir() and [u["alive"] for u in cache.unfinished()] == [None]


def test_a_build_killed_after_writing_its_meta_is_unfinished_not_an_entry():
    """Killed between writing meta.json and the rename, a build's scratch directory was also listed by `harness
    cache ls` as a finished entry, and `cache rm --all` removed it, a live build's included."""
    import json
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    scratch = cache.cache_root() / "model" / f"{cache.SCRATCH}k12-{cache.this_host()}-{gone.stdout.strip()}"
    scratch.mkdir(parents=True)
    (scratch / cache.META).write_text(json.dumps({"kind": "model", "key": "k12", "files": {}}))
    assert cache.entries() == [] and [(u["key"], u["alive"]) for u in cache.unfinished()] == [("k12", False)]


def test_a_cache_directory_that_exists_but_takes_no_files_is_not_writable(monkeypatch):
    """A shared cache mounted read-only exists, so creating it succeeds: only writing a file there tells."""
    from harness.errors import UserError

    monkeypatch.setenv("HARNESS_CACHE", "/proc")  # there, but no file can be made in it (as root too)
    with pytest.raises(UserError, match=r"the artefact cache /proc is not writable .*set HARNESS_CACHE"):
        cache.check_writable()


def test_a_damaged_file_in_a_subdirectory_of_an_artefact_is_detected(capsys):
    with cache.build("adapter", "k13") as d:
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"weights!")
    (cache.lookup("adapter", "k13") / "sub" / "w.bin").write_bytes(b"WEIGHTS!")
    assert cache.lookup("adapter", "k13") is None and "sub/w.bin differs" in capsys.readouterr().err


def test_what_a_builder_adds_to_its_meta_inside_the_build_is_recorded():
    """harness.data.tokens counts the tokens while it writes them, and adds the counts to the meta it gave."""
    import json

    meta = {"what": "a stream"}
    with cache.build("tokens", "k14", meta) as d:
        (d / "tokens.bin").write_bytes(b"t" * 6)
        meta["tokens"] = 3
    assert json.loads((cache.lookup("tokens", "k14") / cache.META).read_text())["tokens"] == 3


def test_a_remembered_hash_cut_off_while_written_is_never_read(tmp_path, monkeypatch):
    """A process killed while it wrote a file's hash must not leave a part of it to be read as the hash, which
    goes into cache keys."""
    from pathlib import Path

    f = tmp_path / "essays.json"
    f.write_text("one")
    real = Path.write_text

    def cut_off(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", cut_off)
        with pytest.raises(KeyboardInterrupt):
            cache.remembered_sha256(f)
    assert cache.remembered_sha256(f) == cache.file_sha256(f)


def test_a_filesystem_without_locks_is_a_clear_error(monkeypatch):
    """Lustre without the flock mount option refuses flock: the raw OSError named nothing to change."""
    import errno
    import fcntl

    from harness.errors import UserError

    def refuse(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(UserError, match=r"\.lock-k1: cannot lock it \(No locks available\): the cache's filesystem "
                                        r"takes no file locks .*set HARNESS_CACHE"):
        cache.ensure("model", "k1", lambda: None)
