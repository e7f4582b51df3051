"""Flags from a config class's type hints, and a config from flags plus an optional ``--config`` file.

A small builder over argparse rather than jsonargparse/tyro/simple-parsing: those change the flag
grammar (lists as ``'[a,b]'`` or ``--x+``, nested ``--group.option`` names, their own config-file
keys), and every flag of round 1 — documented in the README, used by the RayJob and cluster
configs — must keep working unchanged. Types come from one place (:func:`vitdecomp.config.coerce`),
so a flag and a YAML value arrive with the same type, and every bad value is one line naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Optional

from ..config import Config, OptionError, choices_of, coerce, type_hints, unwrap_optional


def flag(name: str) -> str:
    """``batch_size`` → ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _type_fn(hint: Any, name: str) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            return coerce(text, hint, name)
        except OptionError as e:
            raise argparse.ArgumentTypeError(e.message) from None
    convert.__name__ = getattr(hint, "__name__", str(hint))      # argparse names the type in its messages
    return convert


def _default_text(value: Any) -> Optional[str]:
    if value is None or value == "" or value == [] or isinstance(value, bool):
        return None
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_config_arguments(p: argparse.ArgumentParser, cls: type[Config], helps: dict[str, str]) -> None:
    """One flag per field of ``cls`` (types, choices and defaults from the class) plus ``--config``."""
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of option values (keys as the flags, "
                                                    "with - or _); flags given on the command line override it")
    hints = type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    # the job's own options first, then each shared option group under its own heading
    groups: list[tuple[Optional[str], list[str]]] = []
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, Config)) or klass is Config:
            continue
        own = [n for n in klass.__dict__.get("__annotations__", {}) if n in by_name and n not in seen]
        if own:
            title = None if klass is cls else (klass.__doc__ or klass.__name__).strip().splitlines()[0]
            groups.append((title, own))
            seen.update(own)
    required = list(getattr(cls, "REQUIRED", ()))
    for title, names in groups:
        target = p if title is None else p.add_argument_group(title.rstrip("."))
        for name in sorted(names, key=lambda n: n not in required):
            _add_field(target, by_name[name], hints[name], helps, required)


def _add_field(p, f: dataclasses.Field, hint: Any, helps: dict[str, str], required: list[str]) -> None:
    base, _ = unwrap_optional(hint)
    text = helps.get(f.name, "")
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = _default_text(default)
    if f.name in required:
        text += " (required)"
    elif shown is not None and "default" not in text:
        text += f" (default: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
    if base is bool:
        p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        return
    if typing.get_origin(base) in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        choices = choices_of(item)
        kw.update(nargs="+", metavar=_metavar(item, f.name))
        if choices:
            kw["choices"] = choices
        else:
            kw["type"] = _type_fn(item, f.name)
    else:
        choices = choices_of(hint)
        if choices:
            kw["choices"] = choices
        else:
            kw.update(type=_type_fn(hint, f.name), metavar=_metavar(base, f.name))
    p.add_argument(flag(f.name), **kw)


def _metavar(hint: Any, name: str) -> str:
    if hint is int:
        return "N"
    if hint is float:
        return "X"
    if typing.get_origin(hint) is dict or hint is dict:
        return "JSON"
    return name.upper()


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML/JSON mapping of option values (keys as flags, ``-`` or ``_``)."""
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as e:
        raise OptionError("config", f"{path!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise OptionError("config", f"{path!r} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise OptionError("config", f"{path!r} must hold a mapping of option: value")
    return raw


def config_from_args(args: argparse.Namespace, cls: type[Config]) -> Config:
    """The config: values of ``--config`` (if given), overridden by the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update({str(k).replace("-", "_"): v for k, v in load_config_file(args.config).items()})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
            raise OptionError("config", f"{args.config!r}: unknown option {unknown[0]!r}"
                                        + (f"; did you mean {close}?" if close else ""))
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls.from_dict(values, where=args.config or "flags")


def add_job_parser(sub: argparse._SubParsersAction, name: str, cls: type[Config], helps: dict[str, str],
                   run: Callable[[Config], Any], **kw) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of ``cls`` and which calls ``run(config)``."""
    p = sub.add_parser(name, **kw)
    add_config_arguments(p, cls, helps)
    p.set_defaults(func=lambda ns: run(config_from_args(ns, cls)))
    return p
