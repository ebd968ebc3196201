"""The ``jtp`` command: installed by the package, one subcommand per ``python -m jtp.X``
program with the same flags; and ``python -m jtp.plan``, the capacity planner's old name,
which stops with the new one instead of running."""

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from jtp.cli import main as command

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_installs_the_jtp_script():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "jtp"]
    assert script.value == "jtp.cli.main:main"
    installed = Path(sys.executable).parent / "jtp"  # pip put it beside the interpreter
    assert installed.is_file()


def test_every_program_is_a_subcommand():
    programs = {p.stem for p in (ROOT / "jtp").glob("*.py")} - {"__init__", "__main__"}
    programs |= {p.parent.name for p in (ROOT / "jtp").glob("*/__main__.py")}
    programs -= {"errors", "hf", "mesh", "plans", "xla_flags", "host_memory", "plan"}  # modules
    assert programs == set(command.COMMANDS)


def test_help_and_an_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as done:
        command.main(["--help"])
    assert done.value.code == 0 and "capacity" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        command.main(["plan"])
    assert done.value.code == 2 and "jtp capacity" in capsys.readouterr().err


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PATH": str(Path(sys.executable).parent), "JTP_COMPILATION_CACHE": "off"},
    )


def test_the_script_runs_a_subcommand_as_its_module_does():
    """``jtp capacity ...`` and ``python -m jtp.capacity ...`` print the same table (the
    script as a user runs it: a process, found on the PATH); usage lines name the form
    that was typed."""
    args = (
        "--model tiny --devices 8 --global-batch 8 --seq-len 32 --tensor 8 --remat none"
        " --precision 32-true"
    ).split()
    by_script = _run("jtp", "capacity", *args)
    by_module = _run(sys.executable, "-m", "jtp.capacity", *args)
    assert by_script.returncode == by_module.returncode == 0, by_script.stderr
    assert by_script.stdout == by_module.stdout and "* recommended: 1x8" in by_script.stdout
    assert _run("jtp", "train", "--help").stdout.startswith("usage: jtp train")
    assert _run(sys.executable, "-m", "jtp.train", "--help").stdout.startswith(
        "usage: python -m jtp.train"
    )


def test_the_old_planner_name_points_to_the_new_one():
    done = _run(sys.executable, "-m", "jtp.plan", "--model", "tiny", "--devices", "8")
    assert done.returncode == 2 and done.stdout == ""
    assert "python -m jtp.capacity --model tiny --devices 8" in done.stderr
