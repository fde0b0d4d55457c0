"""What comes in from outside, checked in one place: the shape of every JSON and YAML file and
every structure read back from a checkpoint, the files that may be read at all, and the text
that may reach the tokenizer. Each failure is one UserError naming the file and the part.

Torch-free on purpose (config.py imports it): tensor types are passed in as classes.

A spec says what a value must look like:

  int, float, str, bool     an integer (never a bool), a real number (an int too, inf and nan
                            allowed; see FINITE), a string, a bool
  dict, list, object        any mapping, any list, anything
  a class                   an instance of it (e.g. torch.Tensor)
  None                      None itself
  (spec, spec, ...)         any one of them, e.g. (int, None)
  [spec]                    a list whose every item matches spec
  {"key": spec, ...}        a mapping holding every key (a key written "key?" may be missing);
                            other keys are allowed (newer files may carry more)
  MapOf(spec)               a mapping whose every value matches spec
  Where(spec, ok, words)    spec, and ok(value) is true; words describe it in messages
  OneOf(a, b, ...)          one of these values
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

JSON_LIMIT = 64 << 20  # bytes: meta.json, progress.json, minideep_config.json are a few KB to a few MB
YAML_LIMIT = 1 << 20  # bytes of a --config file or a preset
YAML_NODES = 10_000  # values a YAML document may expand to (aliases counted as copies): presets have ~100


@dataclass(frozen=True)
class MapOf:
    spec: Any


@dataclass(frozen=True)
class Where:
    spec: Any
    ok: Callable[[Any], bool]
    words: str


class OneOf:
    def __init__(self, *values):
        self.values = values


NAT = Where(int, lambda v: v >= 0, "a non-negative integer")
POSITIVE = Where(int, lambda v: v > 0, "a positive integer")
FINITE = Where(float, lambda v: math.isfinite(v), "a finite number")


class _Mismatch(Exception):
    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem


def describe(spec) -> str:
    if spec is int:
        return "an integer"
    if spec is float:
        return "a number"
    if spec is str:
        return "a string"
    if spec is bool:
        return "true or false"
    if spec is dict or isinstance(spec, (dict, MapOf)):
        return "a mapping"
    if spec is list or isinstance(spec, list):
        return "a list"
    if spec is None:
        return "null"
    if isinstance(spec, tuple):
        return " or ".join(describe(s) for s in spec)
    if isinstance(spec, Where):
        return spec.words
    if isinstance(spec, OneOf):
        return "one of " + ", ".join(repr(v) for v in spec.values)
    if spec is object:
        return "anything"
    return f"a {getattr(spec, '__name__', spec)}"


def kind(value) -> str:
    """A value's kind in words, short (a damaged file may hold anything, of any size)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return "a number" if len(repr(value)) > 40 else repr(value)
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _matches(value, spec, path: str) -> None:
    """Raise _Mismatch(path, problem) where value first differs from spec."""
    if isinstance(spec, tuple):
        for s in spec:
            try:
                return _matches(value, s, path)
            except _Mismatch as e:
                if e.path != path:  # the right kind, wrong inside: that is the problem to name
                    raise
        raise _Mismatch(path, f"should be {describe(spec)}, got {kind(value)}")
    bad = _Mismatch(path, f"should be {describe(spec)}, got {kind(value)}")
    if spec is None:
        if value is not None:
            raise bad
    elif spec is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
    elif spec is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
    elif isinstance(spec, Where):
        try:
            _matches(value, spec.spec, path)
        except _Mismatch as e:
            raise bad if e.path == path else e  # named by its own words, unless the problem is deeper
        if not spec.ok(value):
            raise bad
    elif isinstance(spec, OneOf):
        if not any(type(value) is type(v) and value == v for v in spec.values):
            raise bad
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise bad
        for i, item in enumerate(value):
            _matches(item, spec[0], f"{path}[{i}]")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise bad
        for k, v in value.items():
            _matches(v, spec.spec, _join(path, k))
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise bad
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise _Mismatch(_join(path, name), "is missing")
            _matches(value[name], sub, _join(path, name))
    elif spec is object:
        return
    elif not isinstance(value, spec):
        raise bad


def _join(path: str, key) -> str:
    key = str(key)[:40]
    return f"{path}.{key}" if path else key


def check(value, spec, what: str, path: str = ""):
    """value, if it matches spec; else UserError "WHAT is damaged: PATH should be ..."."""
    try:
        _matches(value, spec, path)
    except _Mismatch as e:
        raise UserError(f"{what} is damaged: {e.path or 'it'} {e.problem}")
    return value


# ---------------------------------------------------------------- files


def regular_file(path: str | os.PathLike, what: str, limit: int | None = None) -> Path:
    """path, if it is a regular file (after links) of at most `limit` bytes: a device such as
    /dev/zero, a FIFO or a socket is refused before it is opened (opening a FIFO blocks)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {p}")
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror or e}")
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {p} is not a regular file (a device, FIFO or socket): refused")
    if limit is not None and st.st_size > limit:
        raise UserError(f"{what} {p} is {st.st_size:,} bytes, more than the {limit:,} this reads")
    return p


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    p = regular_file(path, what, limit)
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)  # a file that grew since stat() is still bounded
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror or e}")
    if len(data) > limit:
        raise UserError(f"{what} {p} is more than the {limit:,} bytes this reads")
    return data


def parse_json(text: str | bytes, spec, what: str):
    """JSON text that matches spec, or a UserError naming `what` as damaged."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too many digits, too deep
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{what} is damaged: not valid JSON ({first})")
    return check(value, spec, what)


def read_json(path: str | os.PathLike, spec, what: str | None = None, limit: int = JSON_LIMIT):
    """The JSON file at path, checked against spec; `what` names it in messages (default: path)."""
    what = what or str(path)
    return parse_json(read_bytes(path, what, limit), spec, what)


def read_yaml(path: str | os.PathLike, what: str, limit: int = YAML_LIMIT, max_nodes: int = YAML_NODES) -> dict:
    """A YAML mapping from a regular file of at most `limit` bytes, whose document expands to at
    most max_nodes values (an alias counts as a copy of what it names, so a "billion laughs"
    file is refused before anything is built from it)."""
    import yaml

    raw = read_bytes(path, what, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not valid UTF-8 text (byte {e.start})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        n = _expanded_size(node, {}, set(), max_nodes)
        if n > max_nodes:
            raise UserError(f"{what} {path} expands to more than {max_nodes:,} values (aliases counted as "
                            "copies): refused")
        d = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}")
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply")
    finally:
        loader.dispose()
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{what} {path} must be a mapping of sections (model:, train:, ...)")
    return d


def _expanded_size(node, memo: dict, active: set, cap: int) -> int:
    """Values node stands for with every alias expanded, counted without expanding (a shared
    node is counted once per use, from a memo); stops counting past cap."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise UserError("a YAML alias refers to itself: refused")
    active.add(key)
    n = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            n += _expanded_size(k, memo, active, cap) + _expanded_size(v, memo, active, cap)
            if n > cap:
                break
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            n += _expanded_size(v, memo, active, cap)
            if n > cap:
                break
    active.discard(key)
    memo[key] = n
    return n


# ---------------------------------------------------------------- text and JSON out

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, label: str) -> str:
    """text, if it can be encoded as UTF-8 (what the tokenizer takes); else one line naming
    label. A command line's invalid bytes and JSON's "\\ud800" escapes arrive as lone surrogates."""
    if not isinstance(text, str):
        raise UserError(f"{label} is not text, got {kind(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{label} is not valid UTF-8 text (character {e.start})")
    return text


def repair_text(text: str) -> str:
    """Corpus text as the tokenizer can take it: every lone surrogate (U+D800 to U+DFFF, which
    UTF-8 cannot encode; JSON escapes such as a cut-off emoji's half) becomes U+FFFD, the
    replacement character. Valid text is returned as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def finite_or_null(value):
    """value with every non-finite float (inf, -inf, nan) replaced by None: JSON has no such numbers."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return None  # float, numpy's floats
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_text(value, indent: int | None = 2, **kw) -> str:
    """JSON for people and programs: a number that is not finite is written as null (never the
    Infinity or NaN that strict JSON readers reject)."""
    return json.dumps(finite_or_null(value), indent=indent, allow_nan=False, **kw)
