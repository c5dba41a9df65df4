"""Read a configuration file: YAML with positions -> the right model, or every problem at once.

PyYAML composes a node tree that remembers where each value sits; we build plain Python values
from it while recording ``path -> (line, col)``, then validate with pydantic and translate each
pydantic error back to the file position of the field it names, with a spelling suggestion for an
unknown key.

A configuration comes from people and from the API alike, so reading one is bounded before any
value is built (``_check_bounds``, over PyYAML's event stream): the text size, the number of
aliases, the nodes and scalar characters the aliases expand to (an alias counts as the whole value
it stands for, each time it is used) and the nesting depth (aliases included). A 300-byte "billion
laughs" document is refused at the alias that crosses a limit instead of being expanded.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from meshgpu.config.errors import ConfigError, ConfigIssue
from meshgpu.config.infra import (
    FleetConfiguration,
    GatewayConfiguration,
    PresetConfiguration,
    VolumeConfiguration,
)
from meshgpu.config.interpolation import InterpolationError, references
from meshgpu.config.runs import (
    DevEnvironmentConfiguration,
    ServiceConfiguration,
    TaskConfiguration,
)

Configuration = (
    DevEnvironmentConfiguration
    | TaskConfiguration
    | ServiceConfiguration
    | FleetConfiguration
    | VolumeConfiguration
    | GatewayConfiguration
    | PresetConfiguration
)

CONFIG_TYPES: dict[str, type[BaseModel]] = {
    "dev-environment": DevEnvironmentConfiguration,
    "task": TaskConfiguration,
    "service": ServiceConfiguration,
    "fleet": FleetConfiguration,
    "volume": VolumeConfiguration,
    "gateway": GatewayConfiguration,
    "preset": PresetConfiguration,
}

Path_ = tuple[str | int, ...]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Bounds on one configuration (the dstack corpus: at most 3 KB, depth 4, no aliases). Each is far
# above any real file and low enough that the worst document within them parses in well under a
# second and a few MB: the text is a quarter of an API body (1 MiB); 50 000 nodes take about
# 0.4 s to build; the values aliases expand to may not exceed what an API body could carry written
# out; 64 levels keep the recursive walk far from Python's recursion limit.
MAX_CONFIG_BYTES = 256 << 10
MAX_ALIASES = 128
MAX_NODES = 50_000
MAX_EXPANDED_CHARS = 1 << 20
MAX_DEPTH = 64

# ``parse_config_async`` (the API): a parse runs in a worker thread, at most this many at once
# (parsing is pure Python: more threads would only take the GIL from the event loop), and the
# request gets an answer after ``PARSE_TIMEOUT`` s at the latest, waiting for a thread included.
# A thread cannot be stopped: the bounds above are what keep each parse short.
PARSE_THREADS = 2
PARSE_TIMEOUT = 10.0


class Positions(dict[Path_, tuple[int, int]]):
    """Where each value (and, under ``("key",) + path``, each mapping key) starts, 1-based, in
    ``file``."""

    file: str = "<string>"


def _build(
    node: yaml.Node, path: Path_, pos: Positions, issues: list[ConfigIssue], file: str
) -> Any:
    pos[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged = _build(value_node, path, pos, issues, file)
                for m in merged if isinstance(merged, list) else [merged]:
                    if isinstance(m, dict):
                        for k, v in m.items():
                            out.setdefault(k, v)
                continue
            key = _scalar(key_node)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                issues.append(_issue(file, key_node, path, "mapping keys must be plain names"))
                continue
            key = str(key) if not isinstance(key, str) else key
            if key in out:
                issues.append(
                    _issue(
                        file,
                        key_node,
                        path + (key,),
                        "key given twice; keep one (YAML keeps the last)",
                    )
                )
            pos[("key",) + path + (key,)] = (
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
            )
            out[key] = _build(value_node, path + (key,), pos, issues, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), pos, issues, file) for i, item in enumerate(node.value)]
    try:
        return _scalar(node)
    except _BadValue as e:
        e.path = e.path or path
        raise


def _scalar(node: yaml.Node) -> Any:
    # The safe constructor resolves tags (int, float, bool, null, timestamps) exactly as PyYAML
    # does for ``safe_load``; a throwaway instance is cheap.
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # An explicit tag the value does not fit (``!!int abc``, ``!!binary x``) or an unknown one.
        problem = getattr(e, "problem", None) or str(e)
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _BadValue(node, f"cannot read this value as {tag}: {problem}") from None


class _BadValue(Exception):
    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.node, self.message = node, message
        self.path: Path_ = ()


class _Bounds:
    """Running totals of ``_check_bounds``; per open collection, ``[anchor, nodes and characters
    before it, its depth, the deepest level reached inside it]``."""

    __slots__ = ("aliases", "anchors", "chars", "frames", "nodes", "open")

    def __init__(self) -> None:
        self.aliases = self.nodes = self.chars = 0
        self.anchors: dict[str, tuple[int, int, int]] = {}  # anchor -> nodes, chars, height
        self.frames: list[list[Any]] = []
        self.open: set[str] = set()


def _bounds_issue(file: str, mark: Any, message: str) -> ConfigError:
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return ConfigError([ConfigIssue(file, line, col, "", message)])


def _check_text(text: str, file: str) -> None:
    """The size limit, and no lone UTF-16 surrogates (a JSON ``"\\ud800"``): they are not text,
    and UTF-8 (YAML's reader, the API's responses, the replicated log) cannot encode them."""
    if len(text) > MAX_CONFIG_BYTES:  # UTF-8 has at least a byte per character
        raise _too_large(file, f"at least {len(text)}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise _surrogate(file, text, e.start) from None
    if size > MAX_CONFIG_BYTES:
        raise _too_large(file, str(size))


def _too_large(file: str, size: str | None) -> ConfigError:
    return ConfigError(
        [
            ConfigIssue(
                file,
                None,
                None,
                "",
                f"the configuration is {size + ' bytes, ' if size else ''}over the "
                f"{MAX_CONFIG_BYTES}-byte limit: "
                "keep large data (scripts, lists) in files the run reads instead",
            )
        ]
    )


def _surrogate(file: str, text: str, index: int) -> ConfigError:
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return ConfigError(
        [
            ConfigIssue(
                file,
                line,
                col,
                "",
                f"character U+{ord(text[index]):04X} is a lone UTF-16 surrogate, not text: "
                "remove it or write the character it was meant to be (a client sent "
                "half of a surrogate pair)",
            )
        ]
    )


def _check_bounds(text: str, file: str) -> None:
    """Walk the YAML event stream once, before composing, and stop at the first limit crossed.

    An alias adds the nodes, characters and depth of the whole value its anchor stands for, each
    time it is used, which is what building the value would cost. Counting events costs a few
    percent of a parse; nothing is expanded."""
    b = _Bounds()
    for event in yaml.parse(text, Loader=_Loader):
        cls = type(event)
        if cls is yaml.ScalarEvent:
            value = event.value
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:  # an escaped "\\ud800" (the pure-Python reader)
                    raise _bounds_issue(
                        file,
                        event.start_mark,
                        f"character U+{ord(value[e.start]):04X} is a lone UTF-16 surrogate, "
                        "not text: remove it or write the character it was meant to be",
                    ) from None
            nodes, chars, height = 1, len(value), 0
            if event.anchor is not None:
                b.anchors[event.anchor] = (nodes, chars, height)
        elif cls is yaml.AliasEvent:
            b.aliases += 1
            if b.aliases > MAX_ALIASES:
                raise _bounds_issue(
                    file,
                    event.start_mark,
                    f"more than {MAX_ALIASES} YAML aliases (*name): write the values out or "
                    "use fewer aliases",
                )
            if event.anchor in b.open:
                raise _bounds_issue(
                    file,
                    event.start_mark,
                    f"alias *{event.anchor} is inside the value of its own anchor "
                    f"&{event.anchor}, which makes it infinitely deep: refer to it after the "
                    "value ends",
                )
            # An undefined alias is left to the composer, which reports it.
            nodes, chars, height = b.anchors.get(event.anchor, (1, 0, 0))
        elif cls is yaml.SequenceStartEvent or cls is yaml.MappingStartEvent:
            depth = len(b.frames) + 1
            if depth > MAX_DEPTH:
                raise _bounds_issue(
                    file,
                    event.start_mark,
                    f"nested more than {MAX_DEPTH} levels deep: flatten the structure",
                )
            b.frames.append([event.anchor, b.nodes, b.chars, depth, depth])
            if event.anchor is not None:
                b.open.add(event.anchor)
            b.nodes += 1
            _check_totals(b, file, event.start_mark)
            continue
        elif cls is yaml.SequenceEndEvent or cls is yaml.MappingEndEvent:
            anchor, nodes_before, chars_before, depth, deepest = b.frames.pop()
            if b.frames:
                b.frames[-1][4] = max(b.frames[-1][4], deepest)
            if anchor is not None:
                b.open.discard(anchor)
                b.anchors[anchor] = (
                    b.nodes - nodes_before,
                    b.chars - chars_before,
                    deepest - depth + 1,
                )
            continue
        else:
            continue
        # A scalar or an alias, inside the innermost open collection (if any).
        b.nodes += nodes
        b.chars += chars
        if b.frames and height:
            frame = b.frames[-1]
            reached = frame[3] + height
            if reached > MAX_DEPTH:
                raise _bounds_issue(
                    file,
                    event.start_mark,
                    f"with its aliases expanded, the value is nested more than {MAX_DEPTH} "
                    "levels deep: write the values out or use fewer nested anchors",
                )
            frame[4] = max(frame[4], reached)
        _check_totals(b, file, event.start_mark)


def _check_totals(b: _Bounds, file: str, mark: Any) -> None:
    if b.nodes > MAX_NODES:
        raise _bounds_issue(
            file,
            mark,
            f"YAML aliases expand to more than {MAX_NODES} nodes: write the values out or use "
            "fewer anchors"
            if b.aliases
            else f"more than {MAX_NODES} values in one configuration: split it or keep the data "
            "in files the run reads",
        )
    if b.chars > MAX_EXPANDED_CHARS:
        raise _bounds_issue(
            file,
            mark,
            f"YAML aliases expand to more than {MAX_EXPANDED_CHARS} characters of values: write "
            "the values out or use fewer anchors",
        )


def _issue(file: str, node: yaml.Node, path: Path_, message: str) -> ConfigIssue:
    return ConfigIssue(
        file, node.start_mark.line + 1, node.start_mark.column + 1, fmt_path(path), message
    )


def fmt_path(path: Path_) -> str:
    """``replicas[0].image``: a field's path as issues show it."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable through Optional/Union/list/dict/Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple) or origin is not None:
        for arg in typing.get_args(annotation):
            out.extend(models_in(arg))
    return out


def _models_at(root: type[BaseModel], path: Path_) -> list[type[BaseModel]]:
    models = [root]
    for part in path:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            field = m.model_fields.get(part) or next(
                (f for f in m.model_fields.values() if f.alias == part), None
            )
            if field is not None:
                nxt.extend(models_in(field.annotation))
        if part == "replicas" and ServiceConfiguration in models:
            nxt.extend(models_in(ServiceConfiguration.model_fields["groups"].annotation))
        models = nxt
    return models


def _field_names(models: list[type[BaseModel]]) -> list[str]:
    names: list[str] = []
    for m in models:
        for name, f in m.model_fields.items():
            names.append(f.alias or name)
    return names


def _real_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Drop pydantic's union-member and validator tags from ``loc``, keeping data keys."""
    path: list[str | int] = []
    cur = data
    for part in loc:
        if (
            isinstance(cur, dict)
            and isinstance(part, str)
            and part in cur
            or isinstance(cur, list)
            and isinstance(part, int)
            and 0 <= part < len(cur)
        ):
            path.append(part)
            cur = cur[part]
        elif (
            isinstance(cur, dict)
            and isinstance(part, str)
            and part in ("groups",)
            and "replicas" in cur
        ):
            path.append("replicas")  # service replica groups written as ``replicas: [...]``
            cur = cur["replicas"]
    return tuple(path)


def _at(data: Any, path: Path_) -> Any:
    for p in path:
        data = data[p]
    return data


def _message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "missing":
        return f"missing required field {err['loc'][-1]!r}"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] in ("literal_error", "enum"):
        return msg.replace("Input should be", "expected")
    if msg.startswith("Input should be"):
        got = err.get("input")
        text = msg.replace("Input should be", "expected") + f", got {got!r}"
        if err["type"] == "string_type" and isinstance(got, dict) and len(got) == 1:
            # The classic YAML trap: an unquoted "echo a: b" is read as a mapping.
            text += "; YAML read 'key: value' in it as a mapping -- quote the whole item"
        return text
    return msg


def _translate(
    exc: ValidationError, model: type[BaseModel], data: Any, pos: Positions, file: str
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _real_path(data, loc)
        suggestion = None
        if err["type"] == "extra_forbidden":
            key = path[-1] if path else loc[-1]
            parent = path[:-1]
            candidates = _field_names(_models_at(model, parent))
            close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
            suggestion = close[0] if close else None
            line_col = pos.get(("key",) + path) or pos.get(path)
        elif err["type"] == "missing":
            line_col = pos.get(path)
            path = path + (loc[-1],)
        else:
            cause = (err.get("ctx") or {}).get("error")
            field = getattr(cause, "field", None)
            sub = _at(data, path)
            if isinstance(field, tuple):  # a rule that points inside a field (hosts[3])
                path = path + field
                line_col = pos.get(path) or pos.get(path[:-1])
            elif field is not None and isinstance(sub, dict):
                path = path + (field,)
                line_col = pos.get(("key",) + path) or pos.get(path[:-1])
            else:
                line_col = pos.get(path)
        # A value that matches no member of a union yields one error per member; keep the first.
        dedup = (fmt_path(path), err["type"] if err["type"] != "extra_forbidden" else str(loc))
        if dedup in seen and err["type"] != "extra_forbidden":
            continue
        seen.add(dedup)
        line, col = line_col if line_col else (None, None)
        issues.append(ConfigIssue(file, line, col, fmt_path(path), _message(err), suggestion))
    return issues


def _check_references(
    data: Any, path: Path_, pos: Positions, file: str, out: list[ConfigIssue]
) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            _check_references(v, path + (k,), pos, file, out)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_references(v, path + (i,), pos, file, out)
    elif isinstance(data, str) and "${{" in data:
        try:
            references(data)
        except InterpolationError as e:
            line, col = pos.get(path, (None, None))
            out.append(ConfigIssue(file, line, col, fmt_path(path), str(e)))


_KEEP_ONE = "{a} and {b} are mutually exclusive: keep one of them"
_EXCLUSIVE = (
    ("image", "python", "python", _KEEP_ONE),
    ("image", "docker", "docker", _KEEP_ONE),
    ("python", "docker", "docker", _KEEP_ONE),
    ("nodes", "groups", "nodes", "{a} and {b} are mutually exclusive: give nodes per group"),
)


def _check_exclusive(
    data: Any, path: Path_, pos: Positions, file: str, out: list[ConfigIssue]
) -> None:
    """Report conflicting fields even when other fields fail validation (pydantic runs model
    validators only on otherwise valid input, and a user should see every problem at once)."""
    if not isinstance(data, dict):
        return
    for a, b, field, message in _EXCLUSIVE:
        if data.get(a) not in (None, False) and data.get(b) not in (None, False):
            line, col = pos.get(("key",) + path + (field,), (None, None))
            out.append(
                ConfigIssue(file, line, col, fmt_path(path + (field,)), message.format(a=a, b=b))
            )
    for key in ("groups", "replicas"):
        if isinstance(data.get(key), list):
            for i, item in enumerate(data[key]):
                _check_exclusive(item, path + (key, i), pos, file, out)


def parse_config(text: str, file: str = "<string>") -> Configuration:
    """Parse one configuration document; raise ConfigError listing every problem.

    Input is bounded first (see ``MAX_CONFIG_BYTES`` and the other limits above): a document
    over a limit is refused without building its values."""
    return parse_config_located(text, file)[0]


def parse_config_located(text: str, file: str = "<string>") -> tuple[Configuration, Positions]:
    """``parse_config``, and where each field is written (``Positions``: for the checks made
    after parsing, e.g. ``config/support.py`` ``check_support``, to point at the field)."""
    file = printable(file)
    _check_text(text, file)
    try:
        _check_bounds(text, file)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
        raise ConfigError(
            [ConfigIssue(file, line, col, "", f"YAML syntax error: {problem}")]
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError([ConfigIssue(file, None, None, "", f"YAML error: {e}")]) from None
    if node is None:
        raise ConfigError(
            [ConfigIssue(file, 1, 1, "", "the file is empty: it needs at least type: ...")]
        )
    issues: list[ConfigIssue] = []
    pos = Positions()
    pos.file = file
    try:
        data = _build(node, (), pos, issues, file)
    except _BadValue as e:
        raise ConfigError([_issue(file, e.node, e.path, e.message)]) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [
                _issue(
                    file,
                    node,
                    (),
                    "a configuration is a mapping of fields, starting with type: task",
                )
            ]
        )
    kind = data.get("type")
    if kind is None:
        raise ConfigError(
            [
                ConfigIssue(
                    file,
                    1,
                    1,
                    "type",
                    f"missing required field 'type': one of {', '.join(CONFIG_TYPES)}",
                )
            ]
        )
    model = CONFIG_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        close = difflib.get_close_matches(str(kind), list(CONFIG_TYPES), n=1)
        line, col = pos.get(("type",), (None, None))
        raise ConfigError(
            [
                ConfigIssue(
                    file,
                    line,
                    col,
                    "type",
                    f"unknown type {kind!r}: use one of {', '.join(CONFIG_TYPES)}",
                    close[0] if close else None,
                )
            ]
        )
    _check_references(data, (), pos, file, issues)
    _check_exclusive(data, (), pos, file, issues)
    try:
        config = model.model_validate(data)
    except ValidationError as e:
        issues.extend(_translate(e, model, data, pos, file))
        config = None
    if issues:
        unique = {(i.path, i.message): i for i in issues}
        issues = list(unique.values())
        issues.sort(key=lambda i: (i.line or 0, i.col or 0))
        raise ConfigError(issues)
    return config, pos  # type: ignore[return-value]


def printable(file: str) -> str:
    """A file name from an API request is echoed in every issue: no lone surrogates in it."""
    if file.isascii():
        return file
    return file.encode("utf-8", "backslashreplace").decode("utf-8")


def load_config(path: str | Path) -> Configuration:
    """Read and parse a configuration file."""
    return load_config_located(path)[0]


def load_config_located(path: str | Path) -> tuple[Configuration, Positions]:
    """Read and parse a configuration file, with where each field is written."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # not a whole multi-GB file to refuse it
        if len(data) > MAX_CONFIG_BYTES:
            raise _too_large(str(p), None)
        # Universal newlines, as reading in text mode gives.
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(p), None, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            [ConfigIssue(str(p), None, None, "", f"cannot read the file: {e}")]
        ) from None
    return parse_config_located(text, str(p))
