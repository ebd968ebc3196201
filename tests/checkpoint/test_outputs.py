"""Where jtp may write (jtp.checkpoint.outputs), case by case: what is accepted, what is
refused and what each refusal names. The programs' end-to-end refusals are in
tests/cli/test_bad_inputs.py."""

import os

import pytest

from jtp.checkpoint.outputs import (
    OutputError,
    artifact_kind,
    check_output_dir,
    check_output_file,
    write_marker,
)


def test_a_directory_output_is_absent_empty_or_the_same_kind(tmp_path):
    check_output_dir(str(tmp_path / "new"), "hf-checkpoint", flag="--export-hf")
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), "hf-checkpoint", flag="--export-hf")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    write_marker(str(tmp_path / "old"), "hf-checkpoint")
    check_output_dir(str(tmp_path / "old"), "hf-checkpoint", flag="--export-hf")
    with pytest.raises(OutputError, match="a Hugging Face checkpoint written by jtp, not a PEFT"):
        check_output_dir(str(tmp_path / "old"), "peft-adapter", flag="--export-peft")


def test_an_older_prepared_dataset_is_recognised_by_its_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text('{"format": "jtp-tokens/1"}')
    assert artifact_kind(str(tmp_path / "d")) == "token-dataset"
    (tmp_path / "d" / "meta.json").write_text("not json")
    assert artifact_kind(str(tmp_path / "d")) is None


def test_read_only_and_missing_places_are_refused(tmp_path, monkeypatch):
    """A read-only parent (simulated: these tests run as root, who may write anywhere), a
    missing parent (unless parents may be made), a file where a directory goes."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(OutputError, match="is not writable"):
        check_output_dir(str(tmp_path / "out"), "hf-checkpoint", flag="--export-hf")
    with pytest.raises(OutputError, match="is not writable"):
        check_output_file(str(tmp_path / "m.json"), flag="--metrics-json")
    monkeypatch.setattr(os, "access", real)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_dir(str(tmp_path / "a" / "b"), "hf-checkpoint", flag="--export-hf")
    check_output_dir(str(tmp_path / "a" / "b"), "token-dataset", flag="--out", parents=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(str(tmp_path / "f"), "token-dataset", flag="--out")
    with pytest.raises(OutputError, match="is not a directory"):  # a file as the parent
        check_output_dir(str(tmp_path / "f" / "x"), "token-dataset", flag="--out", parents=True)


@pytest.mark.parametrize("inside", ["same", "output-inside", "input-inside"])
def test_an_output_never_overlaps_an_input(tmp_path, inside):
    data = tmp_path / "data"
    data.mkdir()
    out = {"same": data, "output-inside": data / "x", "input-inside": tmp_path}[inside]
    with pytest.raises(OutputError, match="overlaps --data"):
        check_output_dir(
            str(out), "hf-checkpoint", flag="--export-hf", inputs=[("--data", str(data))]
        )
