"""Flags derived from dataclass fields (jtp.cli.flags), and ``python -m jtp.train``'s: every
field of the task configs and of TrainerOptions is a flag named after it, with its default
and its docstring entry as help, mapping back to it; every flag the CLI had keeps parsing,
to the same values as its Lightning spelling."""

import argparse
import dataclasses

import pytest

from jtp.cli.flags import ArgumentParser, FieldFlags, field_docs, flag, options_from_args
from jtp.cli.train import build_parser
from jtp.recipes import FeedForwardConfig, LlamaTaskConfig
from jtp.training.options import TrainerOptions

CLASSES = (FeedForwardConfig, LlamaTaskConfig, TrainerOptions)
FIELDS = [(cls, f) for cls in CLASSES for f in dataclasses.fields(cls)]

# Every flag of the CLI before its flags were derived: (argv, dest, value it set).
OLD_FLAGS = [
    (["--devices", "8"], "devices", 8),
    (["--data-parallel", "2"], "data_parallel", 2),
    (["--tensor-parallel", "4"], "tensor_parallel", 4),
    (["--fsdp"], "fsdp", True),
    (["--model", "llama"], "model", "llama"),
    (["--preset", "llama3-8b"], "preset", "llama3-8b"),
    (["--hf", "ckpt"], "hf", "ckpt"),
    (["--seq-len", "16"], "seq_len", 16),
    (["--sequence-parallel"], "sequence_parallel", True),
    (["--loss-parallel"], "loss_parallel", True),
    (["--remat"], "remat", "full"),  # was True: "full" is what True meant
    (["--precision", "bf16-mixed"], "precision", "bf16-mixed"),
    (["--dim", "64"], "dim", 64),
    (["--hidden-dim", "128"], "hidden_dim", 128),
    (["--batch-size", "4"], "batch_size", 4),
    (["--samples", "16"], "samples", 16),
    (["--max-epochs", "2"], "max_epochs", 2),
    (["--max-steps", "5"], "max_steps", 5),
    (["--lr", "0.01"], "lr", 0.01),
    (["--seed", "3"], "seed", 3),
    (["--log-every", "5"], "log_every_n_steps", 5),
    (["--accumulate-grad-batches", "2"], "accumulate_grad_batches", 2),
    (["--root-dir", "out"], "default_root_dir", "out"),
    (["--no-progress"], "enable_progress_bar", False),
    (["--explain"], "explain", True),
    (["--check-replicas", "1"], "check_replicas", 1),
    (["--metrics-json", "m.json"], "metrics_json", "m.json"),
    (["--checkpoint-dir", "ck"], "checkpoint_dir", "ck"),
    (["--checkpoint-every", "3"], "checkpoint_every_n_steps", 3),
    (["--keep-last", "2"], "keep_last", 2),
    (["--resume"], "resume", True),
    (["--export", "flat"], "export", "flat"),
    (["--export-hf", "hfout"], "export_hf", "hfout"),
    (["--data", "text"], "data", "text"),
    (["--lr-schedule", "cosine"], "lr_schedule", "cosine"),
    (["--warmup-steps", "2"], "warmup_steps", 2),
    (["--weight-decay", "0.1"], "weight_decay", 0.1),
    (["--val-check-interval", "3"], "val_check_interval", 3),
    (["--check-val-every-n-epoch", "1"], "check_val_every_n_epoch", 1),
    (["--limit-val-batches", "2"], "limit_val_batches", 2),
    (["--logger", "none"], "logger", None),
    (["--logger", "jsonl"], "logger", "jsonl"),
    (["--coordinator", "host:1234"], "coordinator", "host:1234"),
    (["--num-processes", "2"], "num_processes", 2),
    (["--process-id", "1"], "process_id", 1),
    (["--stop-check-every", "2"], "stop_check_every_n_steps", 2),
    (["--heartbeat-timeout", "10"], "heartbeat_timeout", 10),
]
RENAMED = {  # old spelling -> Lightning's
    "--log-every": "--log-every-n-steps",
    "--root-dir": "--default-root-dir",
    "--no-progress": "--no-enable-progress-bar",
    "--checkpoint-every": "--checkpoint-every-n-steps",
    "--stop-check-every": "--stop-check-every-n-steps",
}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The action of each dest (the first, where an alias adds a second)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        actions.setdefault(action.dest, action)
    return actions


def _other_value(cls, f: dataclasses.Field):
    """A valid value of field ``f`` other than its default, and its command line."""
    choices = f.metadata.get("choices")
    if choices:
        value = next(c for c in reversed(choices) if c != f.default)
        return value, [flag(f.name), "none" if value is None else value]
    if isinstance(f.default, bool):
        return not f.default, [flag(f.name) if not f.default else "--no-" + flag(f.name)[2:]]
    kind = str(f.type).split(" ")[0]  # "int | None" -> "int"
    value = {"int": lambda: (f.default or 0) + 2, "float": lambda: 0.5, "str": lambda: "dir"}
    value = value[kind]()
    return value, [flag(f.name), str(value)]


@pytest.mark.parametrize("cls,f", FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in FIELDS])
def test_every_field_is_a_flag_with_its_default_mapping_back(cls, f):
    parser = build_parser()
    action = _actions(parser)[f.name]
    assert flag(f.name) in action.option_strings
    assert action.default == f.default and action.help
    assert getattr(options_from_args(cls, parser.parse_args([])), f.name) == f.default
    value, argv = _other_value(cls, f)
    assert getattr(options_from_args(cls, parser.parse_args(argv)), f.name) == value


def test_every_old_flag_is_spelt_out_and_means_what_it_did():
    parser = build_parser()
    parser.allow_abbrev = False  # each old spelling is registered, not a prefix of a new one
    for argv, dest, value in OLD_FLAGS:
        assert getattr(parser.parse_args(argv), dest) == value, argv
        if argv[0] in RENAMED:
            new = [RENAMED[argv[0]], *argv[1:]]
            assert parser.parse_args(argv) == parser.parse_args(new), argv


def test_abbreviations_of_old_flags_still_mean_them():
    """argparse accepts unique prefixes: the longer Lightning names (``--log-every-n-steps``
    beside ``--log-every``) leave every prefix of four letters or more that named one old
    flag naming it still (shorter ones may now be ambiguous: ``--de``, ``--t``, ``--no-``)."""
    parser, old = build_parser(), [argv[0] for argv, _, _ in OLD_FLAGS]
    for argv, dest, value in OLD_FLAGS:
        for end in range(len("--xxxx"), len(argv[0])):
            prefix = argv[0][:end]
            if [o for o in set(old) if o.startswith(prefix)] == [argv[0]]:
                assert getattr(parser.parse_args([prefix, *argv[1:]]), dest) == value, prefix


@dataclasses.dataclass(frozen=True)
class _Base:
    """A base.

    Attributes:
      steps: how many; see ``mode``
        and the rest of this sentence.
      mode: one of :data:`MODES`.
    """

    steps: int | None = None
    mode: str | None = dataclasses.field(default="a", metadata={"choices": ("a", "b", None)})


@dataclasses.dataclass(frozen=True)
class _Child(_Base):
    """A child.

    Attributes:
      on: a switch.

    Returns nothing: another section.
    """

    on: bool = True


def test_field_docs_types_choices_and_aliases():
    assert field_docs(_Child) == {
        "steps": "how many; see --mode and the rest of this sentence.",
        "mode": "one of MODES.",
        "on": "a switch.",
    }
    parser = ArgumentParser()
    FieldFlags(aliases={"on": ("--no-switch",), "steps": ("--n",)}).add(parser, _Child)
    assert options_from_args(_Child, parser.parse_args([])) == _Child()
    args = parser.parse_args(["--n", "3", "--mode", "none", "--no-switch"])
    assert options_from_args(_Child, args) == _Child(steps=3, mode=None, on=False)
    assert parser.parse_args(["--no-on"]).on is False and parser.parse_args(["--on"]).on
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_a_choice_flag_alone_and_negated():
    """``--remat`` alone is ``--remat full`` (what the boolean flag meant), ``--no-remat`` is
    ``--remat none``, and every policy is spelt out; older configs' booleans still work."""
    parser = build_parser()
    remat = lambda argv: options_from_args(LlamaTaskConfig, parser.parse_args(argv)).remat  # noqa: E731
    assert remat([]) == "none" and remat(["--remat"]) == "full" and remat(["--no-remat"]) == "none"
    for policy in ("none", "full", "dots", "minimal"):
        assert remat(["--remat", policy]) == policy
    assert remat(["--remat", "--precision", "bf16-mixed"]) == "full"  # takes no flag as value
    with pytest.raises(SystemExit):
        parser.parse_args(["--remat", "everything"])
    assert (
        LlamaTaskConfig(remat=True).remat == "full" and LlamaTaskConfig(remat=False).remat == "none"
    )
    assert "--remat [{none,full,dots,minimal}]" in parser.format_help()


def test_one_flag_per_field_name_and_documentation_required():
    @dataclasses.dataclass
    class Undocumented:
        steps: int = 1

    @dataclasses.dataclass
    class OtherDefault:
        """Attributes:
        steps: the same name, another default.
        """

        steps: int = 5

    flags = FieldFlags()
    flags.add(argparse.ArgumentParser(), _Base)
    with pytest.raises(ValueError, match="--steps already defaults to None"):
        flags.add(argparse.ArgumentParser(), OtherDefault)
    with pytest.raises(ValueError, match="Undocumented.steps: document it under Attributes"):
        FieldFlags().add(argparse.ArgumentParser(), Undocumented)


def test_help_lists_every_flag():
    text = build_parser().format_help()
    for spelling in [*RENAMED, *RENAMED.values(), "--gradient-clip-val", "--enable-progress-bar"]:
        assert spelling in text
