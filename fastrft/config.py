"""Config files and command-line overrides for a dataclass config.

`load_config(Config, path, ["--key", "value", "--flag", ...])`: defaults, then the YAML file,
then `--key value` / `--key=value` overrides. Values are parsed as YAML scalars (`3e-4`,
`true`, `null`, `[a, b]`) and checked against the field's type. An unknown key is an error
that names the closest valid keys (difflib), wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml


def _unknown(key: str, valid: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"unknown config key {key!r} ({where}){hint}")


def _coerce(name: str, value, tp):
    """`value` as field type `tp` (str, int, float, bool, lists and Optional of those)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"config {name}: {value!r} fits none of {tp}")
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (typing.Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single value is a list of one: --reward_weights 2.0
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {name}: expected a list (a,b or [a, b]), got {value!r}")
        return [_coerce(name, v, inner) for v in value]
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"config {name}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"config {name}: expected a string, got {value!r}")
        return str(value)
    return value


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """["--lr", "3e-4", "--x=1", "--flag"] -> {"lr": 3e-4, "x": 1, "flag": True}."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"expected --key value, got {a!r}")
        key = a[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raw, i = "true", i + 1
        out[key.replace("-", "_")] = _parse_scalar(raw)
    return out


def load_config(cls, path: str | None = None, overrides: list[str] | dict | None = None, base: dict | None = None):
    """An instance of dataclass `cls`: defaults < `base` (a saved run's config.yaml, for resume
    and eval) < YAML file `path` < `overrides`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    valid = sorted(fields)
    values: dict = {k: v for k, v in (base or {}).items() if k in fields}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of keys to values")
        for k, v in data.items():
            if k not in fields:
                raise _unknown(k, valid, f"in {path}")
            values[k] = v
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for k, v in extra.items():
        if k not in fields:
            raise _unknown(k, valid, "on the command line")
        values[k] = v
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path) -> None:
    """Writes atomically (a temporary file, fsynced, then renamed over `path`): a run killed
    while writing it leaves the old config.yaml whole, never a truncated one."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- --help


def yaml_value(value) -> str:
    """A default as one types it on the command line: null, true, 3e-4, colour,count."""
    if isinstance(value, (list, tuple)):
        return ",".join(yaml_value(v) for v in value) if value else "[]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_docs(cls) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(group, [(field, description)])] from the dataclass source: `# --- group` lines start a
    group; a field's description is its trailing comment (continued on `#` lines below it)."""
    import inspect

    names = {f.name for f in dataclasses.fields(cls)}
    groups: list[tuple[str, list[list[str]]]] = [("options", [])]
    last = None
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("# ---"):
            groups.append((s.lstrip("# -").strip(), []))
            last = None
            continue
        name = s.split(":", 1)[0].strip() if ":" in s else ""
        if name in names and not s.startswith("#"):
            comment = s.split("  # ", 1)[1].strip() if "  # " in s else ""
            last = [name, comment]
            groups[-1][1].append(last)
        elif s.startswith("#") and last is not None:
            last[1] = (last[1] + " " + s.lstrip("# ").strip()).strip()
        elif s.startswith("def "):
            break
        else:
            last = None if not s.startswith("#") else last
    return [(g, [(n, d) for n, d in items]) for g, items in groups if items]


def help_text(cls, command: str, keys: tuple[str, ...] | None = None) -> str:
    """`fastrft <command> --help`: every key (or `keys`) grouped, with its default and description."""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls)}
    out = [f"usage: fastrft {command} [--config FILE.yaml] [--key value ...] [--debug]", ""]
    for group, items in field_docs(cls):
        items = [(n, d) for n, d in items if keys is None or n in keys]
        if not items:
            continue
        out.append(f"{group}:")
        for name, doc in items:
            out.append(f"  --{name} {yaml_value(defaults[name])}")
            if doc:
                out.append(f"      {doc}")
        out.append("")
    out.append("Lists take a,b or [a, b] (a single value is a list of one); null, true/false as in YAML.")
    return "\n".join(out)
