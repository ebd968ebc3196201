"""Command-line flags derived from the dataclass fields they set: one spelling per option.

A field ``log_every_n_steps: int = 10`` of a dataclass whose docstring documents it under
``Attributes:`` becomes ``--log-every-n-steps N`` (type int, default 10, help = that entry);
a bool field becomes ``--name`` / ``--no-name``; a field of type ``X | None`` takes an X and
defaults to None; ``dataclasses.field(metadata={"choices": (...)})`` restricts the values
(``None`` among them is spelt ``none``); ``metadata={"bare": value}`` lets the flag stand
alone, meaning ``value`` (``--remat`` = ``--remat full``), and ``{"negated": value}`` adds
``--no-name`` meaning ``value``. Parsed arguments map back by field name
(:func:`options_from_args`), so an option is added in one place: its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from jtp.training.compilation_cache import ENV, default_dir

METAVARS = {int: "N", float: "X", str: "TEXT"}
_MARKUP = re.compile(r"(?::\w+:)?`{1,2}([^`]+)`{1,2}")  # ``x``, `x`, :func:`x` -> x


def flag(name: str) -> str:
    """The flag of a field: ``log_every_n_steps`` -> ``--log-every-n-steps``."""
    return "--" + name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's entry under ``Attributes:`` in the docstrings of ``cls`` and its bases
    (Google style), joined into one line, reST markup removed and a quoted field name
    (````max_steps````) written as its flag (``--max-steps``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attributes(inspect.cleandoc(klass.__dict__.get("__doc__") or "")))

    def plain(match: re.Match) -> str:
        return flag(match[1]) if match[1] in docs else match[1]

    return {name: _MARKUP.sub(plain, doc) for name, doc in docs.items()}


def _attributes(doc: str) -> dict[str, str]:
    lines = doc.splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, str] = {}
    indent, name = None, ""
    for line in lines[lines.index("Attributes:") + 1 :]:
        text = line.lstrip()
        depth = len(line) - len(text)
        indent = depth if indent is None else indent
        if not text or depth < indent:
            break  # the section ends at a blank line or a dedent
        if depth == indent:
            name, _, text = text.partition(":")
            docs[name] = ""
        docs[name] = f"{docs[name]} {text.strip()}".strip()
    return docs


def _scalar(hint: Any) -> type:
    """``int`` for ``int`` and for ``int | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (scalar,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return scalar
    return hint


def _none_or_str(value: str) -> str | None:
    return None if value == "none" else value


class FieldFlags:
    """Adds one flag per dataclass field to a parser (or argument group).

    A field name is one flag however many dataclasses have it (``seed`` sets the task's
    and the Trainer's): their defaults must agree. ``aliases`` maps a field to its other
    spellings (kept working; for a bool, one starting with ``--no-`` sets False);
    ``metavars`` overrides the type's (:data:`METAVARS`).
    """

    def __init__(
        self,
        *,
        aliases: Mapping[str, Sequence[str]] | None = None,
        metavars: Mapping[str, str] | None = None,
    ):
        self.aliases = dict(aliases or {})
        self.metavars = dict(metavars or {})
        self.defaults: dict[str, Any] = {}  # field name -> default, of every flag added

    def add(self, group: Any, cls: type, names: Iterable[str] | None = None) -> None:
        """Flags for ``cls``'s fields (those in ``names``, if given) not added yet."""
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        wanted = None if names is None else set(names)
        for f in dataclasses.fields(cls):
            if wanted is not None and f.name not in wanted:
                continue
            if f.name in self.defaults:
                if self.defaults[f.name] != f.default:
                    raise ValueError(
                        f"{cls.__name__}.{f.name} defaults to {f.default!r} but the flag "
                        f"{flag(f.name)} already defaults to {self.defaults[f.name]!r}"
                    )
                continue
            if f.name not in docs:
                raise ValueError(f"{cls.__name__}.{f.name}: document it under Attributes:")
            self.defaults[f.name] = f.default
            self._add(group, f, _scalar(hints[f.name]), docs[f.name])

    def _add(self, group: Any, f: dataclasses.Field, scalar: type, doc: str) -> None:
        spellings = [flag(f.name), *self.aliases.get(f.name, ())]
        kwargs: dict[str, Any] = dict(dest=f.name, default=f.default, help=doc.replace("%", "%%"))
        if scalar is bool:
            negative = [s for s in spellings if s.startswith("--no-")]
            positive = [s for s in spellings if s not in negative]
            group.add_argument(*positive, action=argparse.BooleanOptionalAction, **kwargs)
            for spelling in negative:
                group.add_argument(
                    spelling,
                    dest=f.name,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    help=f"the same as --no-{positive[0][2:]}",
                )
            return
        choices = f.metadata.get("choices")
        if choices is not None and None in choices:  # spelt "none" on the command line
            names = ",".join("none" if c is None else str(c) for c in choices)
            kwargs.update(type=_none_or_str, choices=choices, metavar=f"{{{names}}}")
        elif choices is not None:
            kwargs.update(type=scalar, choices=choices)
        else:
            kwargs.update(type=scalar, metavar=self.metavars.get(f.name, METAVARS[scalar]))
        if "bare" in f.metadata:  # "--remat" alone means "--remat full"
            kwargs.update(nargs="?", const=f.metadata["bare"])
        group.add_argument(*spellings, **kwargs)
        if "negated" in f.metadata:  # "--no-remat" means "--remat none"
            group.add_argument(
                "--no-" + flag(f.name)[2:],
                dest=f.name,
                action="store_const",
                const=f.metadata["negated"],
                default=argparse.SUPPRESS,
                help=f"the same as {flag(f.name)} {f.metadata['negated']}",
            )


def field_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values ``args`` holds for ``cls``'s fields (those that have a flag)."""
    fields = dataclasses.fields(cls)
    return {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}


def options_from_args[T](cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` built from the parsed flags of its fields (the others keep their defaults)."""
    return cls(**field_values(cls, args))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, where an abbreviation that matches several spellings of one
    option (``--log-ev``: ``--log-every`` and ``--log-every-n-steps``) means that option
    instead of being ambiguous: a longer new name leaves the old one's prefixes working."""

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        matches = super()._get_option_tuples(option_string)
        # One per action and polarity: --no-x and --x of a BooleanOptionalAction differ.
        meanings = {(id(m[0]), m[1].startswith("--no-")) for m in matches}
        return matches[:1] if len(meanings) == 1 else matches


def number(
    kind: type = float,
    *,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` (int or float) ``>= low``, ``> above`` and
    ``<= high`` where given; anything else is argparse's one-line error (exit 2), before
    any work (``--temperature nan`` once generated token 0 forever)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an int" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        for bound, ok, say in (
            (low, lambda b: value >= b, ">="),
            (above, lambda b: value > b, ">"),
            (high, lambda b: value <= b, "<="),
        ):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(f"{text}: must be {say} {bound}")
        return value

    return parse


def add_compilation_cache_flags(parser: argparse.ArgumentParser) -> None:
    """``--compilation-cache DIR`` and ``--no-compilation-cache``: where jax's persistent
    cache lives (:mod:`jtp.training.compilation_cache`), set up before the first compile."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--compilation-cache",
        default=default_dir(),
        metavar="DIR",
        help=f"jax's persistent compilation cache (default: ${ENV}, else ~/.cache/jtp/xla)",
    )
    g.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_const",
        const=None,
        help="compile everything afresh, write nothing",
    )
