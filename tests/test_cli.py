import subprocess
import sys

from harness.cli import main


def test_validate_ok_and_errors_are_one_line(tmp_path, capsys):
    assert main(["validate", "suites/pg19.yaml"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmetrics:\n  perplexity: {contexs: [1]}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 3: metrics.perplexity.contexs" in err and "contexts" in err


def test_console_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not found" in proc.stderr
