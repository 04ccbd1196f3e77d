"""One configuration mechanism for every job.

Each job declares a frozen, keyword-only dataclass whose fields carry a docstring (the
string literal on the line after the field) and validate in `__post_init__`. From it this
module derives, with no per-job code:

- command-line flags: ``--lr-drop-steps 200000 375000``; nested dataclasses use a dotted
  prefix (``--model.width 0.25``); booleans take ``--flag`` / ``--no-flag``;
- named presets: plain functions returning a config (``--preset smoke``);
- ``--config FILE``: JSON or YAML (local path or storage URL) written by another job, e.g.
  the best config of a search; it may hold the whole config or only some fields;
- ``--dry-run``: build and validate the config, print it as JSON and exit without Ray.

Precedence: dataclass defaults < preset < ``--config`` file < flags. A bad value fails with
a clear message before any cluster resource is used, and so does a flag of a field the job
sets itself (a config class's ``SET_BY_THE_JOB``: a search's trials' learning rates).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from jobs import storage

C = TypeVar("C")
Presets = Mapping[str, Callable[[], Any]]


POSITIONAL_PREFIX = "positional:"  # a positional's own name in the parsed namespace
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot be built: unknown keys, wrong types or invalid values."""


# ---------------------------------------------------------------- plain data <-> dataclasses


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run's folder under a storage root, if it cannot."""
    if name in ("", ".", "..") or "/" in name:
        return f"name must be a non-empty folder name, got {name!r}"
    return None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-compatible data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def choice_problems(cfg: Any) -> list[str]:
    """The fields of dataclass `cfg` annotated with a Literal whose value is not one of its
    choices: a config built in code (``dataclasses.replace``) is checked as one read from a
    file or the command line is."""
    problems = []
    for name, tp in _field_types(type(cfg)).items():
        value, choices = getattr(cfg, name), typing.get_args(tp)
        if typing.get_origin(tp) is typing.Literal and value not in choices:
            problems.append(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return problems


CPUS_MIN = 1e-4
"""The fewest CPUs a task or actor may ask of Ray, which counts them in ten-thousandths."""


def positive_problems(cfg: Any, *names: str) -> list[str]:
    """Fields of `cfg` among `names` that are not finite and > 0 (NaN included)."""
    return [f"{n} must be finite and > 0, got {v}" for n in names
            if not 0 < (v := getattr(cfg, n)) < math.inf]  # fmt: skip


def cpus_problems(cfg: Any, *names: str, share: float = 1.0) -> list[str]:
    """Fields of `cfg` among `names`, CPUs asked of Ray (`share` of them by each task), that
    are not finite and at least `CPUS_MIN` a task."""
    least = CPUS_MIN / share
    return [f"{n} must be finite and >= {least:g} (Ray's unit), got {v}" for n in names
            if not least <= (v := getattr(cfg, n)) < math.inf]  # fmt: skip


def empty_problems(cfg: Any, *names: str) -> list[str]:
    """Fields of `cfg` among `names`, paths or URLs, that are given but empty."""
    return [f"{n} is empty: give a path or URL" for n in names if getattr(cfg, n) == ""]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert plain data to the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, _where=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 3e-4 (no dot) as text
    if tp in (int, float, str) and not (isinstance(value, tp) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(
    cls: type[C], data: Mapping[str, Any], *, base: C | None = None, _where: str = ""
) -> C:
    """Build `cls` from plain data; fields missing from `data` come from `base` (or defaults).

    Unknown keys and wrongly typed values raise `ConfigError`; the dataclass's own
    validation runs as it is constructed.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # (a file's key may be a number)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[_where + str(k) for k in unknown]}")
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping) and base is not None:
            kwargs[name] = from_dict(tp, value, base=getattr(base, name), _where=f"{_where}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, _where + name)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)
        return cls(**kwargs)
    except TypeError as e:  # a field without default was not given
        raise ConfigError(f"{cls.__name__}: {e}") from None


def load_config_file(url: str, s3: Any = None) -> dict[str, Any]:
    """Read a JSON or YAML config written by a job or a person (path or storage URL; `s3`:
    the `jobs.storage.S3Options` to reach it, default from the environment)."""
    from jobs import storage  # storage imports fsspec; keep `--help` light

    text = storage.read_bytes(url, s3).decode()
    try:
        if url.endswith(".json"):
            data = json.loads(text, object_pairs_hook=_json_mapping)
        else:
            data = yaml.load(text, Loader=_SafeLoaderOfUniqueKeys)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{url} does not parse: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{url}: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{url}: a config file must hold a mapping, got {type(data).__name__}")
    return dict(data)


def _json_mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (JSON would keep the last one silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ConfigError(f"key {key!r} is given twice")
        data[key] = value
    return data


class _SafeLoaderOfUniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says a mapping's
    keys are unique; PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: the keys written beside it replace the base's
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # refused as a key by the safe loader itself
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"key {key!r} is given twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1's numbers less its octal (``010`` is 8) and base-60 (``1:30`` is 90) forms, which
# would change a value without a word: written so, it is text, which a number field refuses.
# The rest as PyYAML resolves them (binary and hex integers, floats with a dot).
_SafeLoaderOfUniqueKeys.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] not in ("int", "float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoaderOfUniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_SafeLoaderOfUniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def save_config(cfg: Any, url: str, s3: Any = None) -> None:
    """Write the config as JSON (``.json``) or YAML (anything else), readable by ``--config``."""
    from jobs import storage

    data = to_dict(cfg)
    text = json.dumps(data, indent=2) + "\n" if url.endswith(".json") else yaml.safe_dump(data)
    storage.write_bytes(url, text.encode(), s3)


# ---------------------------------------------------------------- command line


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring, as argparse help: the string literal on the line after its
    annotation."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            # argparse formats help with %: a literal one ("60% of them") must be doubled
            docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    set_by_the_job: Mapping[str, str] | None = None,
) -> None:
    docs, set_by_the_job = field_docs(cls), set_by_the_job or getattr(cls, "SET_BY_THE_JOB", {})
    for f in dataclasses.fields(cls):
        tp, path = _field_types(cls)[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            _add_field_flags(parser, tp, prefix=path + ".", set_by_the_job=set_by_the_job)
            continue
        instead = set_by_the_job.get(path)
        kwargs: dict[str, Any] = {
            "dest": path,
            "default": argparse.SUPPRESS,
            "help": f"refused: set by the job for each run; {instead}"
            if instead
            else _with_default(docs.get(f.name), f),
        }
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        optional = origin in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kwargs.update(nargs="*", type=args[0], metavar=args[0].__name__.upper())
            if optional:  # `--lr-range none` clears it
                kwargs.update(type=_none_or(args[0]), action=_TupleOrNone)
        elif origin is typing.Literal:
            kwargs.update(choices=args + ((None,) if optional else ()), type=_none_or(str))
        elif tp in (int, float, str):
            kwargs["type"] = _none_or(tp) if optional else tp
        else:  # mappings and other structured values come from --config files only
            continue
        parser.add_argument(_flag(path), **kwargs)


class _TupleOrNone(argparse.Action):
    """The values of an optional tuple's flag: ``none`` alone is None."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, None if values == [None] else values)


def _with_default(doc: str | None, f: dataclasses.Field) -> str:
    """A flag's help: the field's docstring and its default (a preset may set another),
    unless the docstring gives it itself, "(default ...)"."""
    if doc and "(default" in doc.lower():
        return doc
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return doc or ""
    if isinstance(default, tuple):
        default = " ".join(map(str, default)) or "()"
    shown = "none" if default is None else str(default).replace("%", "%%")  # as in field_docs
    return f"{doc + ' ' if doc else ''}(default: {shown})"


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return nested


def _first_paragraph(fn: Callable[[], Any]) -> str:
    """A preset's summary for --help: its docstring's first paragraph, on one line."""
    return " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split()).rstrip(".")


def build_parser(
    cls: type,
    *,
    presets: Presets | None = None,
    positionals: Sequence[str] = (),
    prog: str | None = None,
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=inspect.getdoc(sys.modules[cls.__module__]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--batch 32` is no flag: a typo, not --batch-size
    )
    docs = field_docs(cls)
    for name in positionals:  # beside its --flag, apart: given both ways, they must agree
        parser.add_argument(
            POSITIONAL_PREFIX + name, metavar=name.upper(), nargs="?",
            default=argparse.SUPPRESS, help=docs.get(name),
        )  # fmt: skip
    if presets:
        lines = [f"{n}: {_first_paragraph(fn)}" for n, fn in presets.items()]
        parser.add_argument(
            "--preset", choices=sorted(presets), help="named configuration; " + "; ".join(lines)
        )
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML config (path or URL)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the config, then exit"
    )
    group = parser.add_argument_group("config fields")
    _add_field_flags(group, cls)  # type: ignore[arg-type]
    return parser


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    presets: Presets | None = None,
    default_preset: str | None = None,
    positionals: Sequence[str] = (),
    prog: str | None = None,
) -> tuple[C, argparse.Namespace]:
    """Parse a job's command line into its validated config (exits with usage on errors)."""
    parser = build_parser(cls, presets=presets, positionals=positionals, prog=prog)
    ns = parser.parse_args(argv)
    flat = {k: v for k, v in vars(ns).items() if k not in ("preset", "config", "dry_run")}
    for name in positionals:
        if (given := flat.pop(POSITIONAL_PREFIX + name, None)) is None:
            continue
        if name in flat and flat[name] != given:  # a stray word, as after a flag taking none
            parser.error(
                f"{name.upper()} given twice: {given!r}, and {flat[name]!r} by "
                f"--{name.replace('_', '-')}"
            )
        flat[name] = given
    for path, instead in getattr(cls, "SET_BY_THE_JOB", {}).items():
        if path in flat:  # (a value a config file holds is the file's writer's, not a flag)
            parser.error(f"{_flag(path)} is set by the job for each run it starts: {instead}")
    try:
        preset = getattr(ns, "preset", None) or default_preset
        base = presets[preset]() if presets and preset else None
        data = _nest(flat)
        if ns.config:
            s3 = _s3_options(cls, data, base)  # the command line's: the file is read first
            data = _over(cls, file := load_config_file(ns.config, s3), data)
            if held := [_flag(p) for p in getattr(cls, "SET_BY_THE_JOB", {}) if _holds(file, p)]:
                print(f"{parser.prog}: note: {ns.config} sets {', '.join(held)}, which the job "
                      "sets for each run it starts: those values are not used",
                      file=sys.stderr)  # fmt: skip
        cfg = from_dict(cls, data, base=base)  # validated once, whole
    except (ValueError, OSError) as e:
        parser.error(str(e))
    return cfg, ns


def _holds(data: Mapping[str, Any], path: str) -> bool:
    """Whether nested config `data` holds the field at dotted `path` (``train.lr``)."""
    head, _, rest = path.partition(".")
    if head not in data:
        return False
    return not rest or (isinstance(data[head], Mapping) and _holds(data[head], rest))


def _over(cls: type, below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """Config data `above` laid over `below`: a nested config merged field by field, any
    other value (a list, a mapping-valued field) replaced whole."""
    types_ = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
    merged = dict(below)
    for name, value in above.items():
        tp = types_.get(name)
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            under = merged.get(name)
            merged[name] = _over(tp, under, value) if isinstance(under, Mapping) else value
        else:
            merged[name] = value
    return merged


def _s3_options(cls: type, data: Mapping[str, Any], base: Any) -> storage.S3Options | None:
    """The first `storage.S3Options` field of `cls` (depth first), as `data` (the command
    line's flags) sets it over `base`; None for a config without one."""
    from jobs import storage

    for name, tp in _field_types(cls).items():
        value = data.get(name)
        below = getattr(base, name, None)
        if tp is storage.S3Options:
            return from_dict(tp, value if isinstance(value, Mapping) else {}, base=below)
        if dataclasses.is_dataclass(tp):
            found = _s3_options(tp, value if isinstance(value, Mapping) else {}, below)
            if found is not None:
                return found
    return None


def run_cli(
    cls: type[C],
    main: Callable[[C], Any],
    argv: Sequence[str] | None = None,
    **parse_kwargs: Any,
) -> Any:
    """The `python -m jobs.<name>` entry point: parse, then print (``--dry-run``) or run."""
    cfg, ns = parse_config(cls, argv, **parse_kwargs)
    if ns.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return None
    return main(cfg)


def run_job(module: str, config: str, **parse_kwargs: Any) -> None:
    """``python -m <module>``: `run_cli` on the module's config class `config`, its `main`
    and its ``PRESETS`` (if it has any), taken from the module imported by its name, not from
    ``__main__``: Ray then pickles the config and the functions it sends to workers by
    reference (by value, a dataclass's annotations would be resolved in a worker's own
    ``__main__``, where they are not defined).

    A user's error the job reports (a plain ValueError: a missing input, a bad model URL, no
    GPUs) ends in one line, ``python -m <module>: error: ...``, and exit status 2, as a
    command-line error does; ``COLORCORE_TRACEBACK=1`` shows the traceback instead."""
    import importlib
    import os

    job = importlib.import_module(module)
    prog = f"python -m {module}"
    presets = getattr(job, "PRESETS", None)
    try:
        run_cli(getattr(job, config), job.main, presets=presets, prog=prog, **parse_kwargs)
    except ValueError as error:
        # Plain ValueError is what the jobs raise for a user's error; subclasses (a Ray task
        # error, Arrow's, JSON's, a codec's) come from deeper down: their traceback stays.
        if type(error) is not ValueError or os.environ.get("COLORCORE_TRACEBACK"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def presets_of(*functions: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """Name presets by their function names."""
    return {fn.__name__: fn for fn in functions}


__all__ = [
    "ConfigError",
    "build_parser",
    "field_docs",
    "from_dict",
    "load_config_file",
    "parse_config",
    "presets_of",
    "run_cli",
    "run_job",
    "save_config",
    "to_dict",
]
