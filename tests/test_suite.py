import pytest

from harness.errors import UserError
from harness.suite import load_suite


def write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_defaults_fill_in(tmp_path):
    s = load_suite(write(tmp_path, "name: x\n"))
    assert s.methods == ["lora"] and s.eval.protocol == "longlora" and s.finetune.context == 2048


def test_unknown_field_suggests_fix(tmp_path):
    with pytest.raises(UserError, match=r"s.yaml: finetune.stepz: unknown field \(did you mean 'steps'\?\)"):
        load_suite(write(tmp_path, "name: x\nfinetune: {stepz: 3}\n"))


@pytest.mark.parametrize("text, match", [
    ("name: x\neval: {protocol: sliding}\n", "eval.protocol"),
    ("name: x\nfinetune: {steps: 0}\n", "finetune.steps"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "YAML mapping"),
    ("description: no name\n", "name: Field required"),
])
def test_bad_input_names_the_field(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_suite(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_suite(tmp_path / "nope.yaml")
