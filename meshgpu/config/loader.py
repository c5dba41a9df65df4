"""Read a configuration file: YAML with positions -> the right model, or every problem at once.

PyYAML composes a node tree that remembers where each value sits; we build plain Python values
from it while recording ``path -> (line, col)``, then validate with pydantic and translate each
pydantic error back to the file position of the field it names, with a spelling suggestion for an
unknown key.
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


class _Positions(dict[Path_, tuple[int, int]]):
    """Where each value (and, under ``("key",) + path``, each mapping key) starts, 1-based."""


def _build(
    node: yaml.Node, path: Path_, pos: _Positions, issues: list[ConfigIssue], file: str
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
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    # The safe constructor resolves tags (int, float, bool, null, timestamps) exactly as PyYAML
    # does for ``safe_load``; a throwaway instance is cheap.
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _issue(file: str, node: yaml.Node, path: Path_, message: str) -> ConfigIssue:
    return ConfigIssue(
        file, node.start_mark.line + 1, node.start_mark.column + 1, _fmt_path(path), message
    )


def _fmt_path(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable through Optional/Union/list/dict/Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple) or origin is not None:
        for arg in typing.get_args(annotation):
            out.extend(_models_in(arg))
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
                nxt.extend(_models_in(field.annotation))
        if part == "replicas" and ServiceConfiguration in models:
            nxt.extend(_models_in(ServiceConfiguration.model_fields["groups"].annotation))
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
    exc: ValidationError, model: type[BaseModel], data: Any, pos: _Positions, file: str
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
            if field is not None and isinstance(sub, dict):
                path = path + (field,)
                line_col = pos.get(("key",) + path) or pos.get(path[:-1])
            else:
                line_col = pos.get(path)
        # A value that matches no member of a union yields one error per member; keep the first.
        dedup = (_fmt_path(path), err["type"] if err["type"] != "extra_forbidden" else str(loc))
        if dedup in seen and err["type"] != "extra_forbidden":
            continue
        seen.add(dedup)
        line, col = line_col if line_col else (None, None)
        issues.append(ConfigIssue(file, line, col, _fmt_path(path), _message(err), suggestion))
    return issues


def _check_references(
    data: Any, path: Path_, pos: _Positions, file: str, out: list[ConfigIssue]
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
            out.append(ConfigIssue(file, line, col, _fmt_path(path), str(e)))


_KEEP_ONE = "{a} and {b} are mutually exclusive: keep one of them"
_EXCLUSIVE = (
    ("image", "python", "python", _KEEP_ONE),
    ("image", "docker", "docker", _KEEP_ONE),
    ("python", "docker", "docker", _KEEP_ONE),
    ("nodes", "groups", "nodes", "{a} and {b} are mutually exclusive: give nodes per group"),
)


def _check_exclusive(
    data: Any, path: Path_, pos: _Positions, file: str, out: list[ConfigIssue]
) -> None:
    """Report conflicting fields even when other fields fail validation (pydantic runs model
    validators only on otherwise valid input, and a user should see every problem at once)."""
    if not isinstance(data, dict):
        return
    for a, b, field, message in _EXCLUSIVE:
        if data.get(a) not in (None, False) and data.get(b) not in (None, False):
            line, col = pos.get(("key",) + path + (field,), (None, None))
            out.append(
                ConfigIssue(file, line, col, _fmt_path(path + (field,)), message.format(a=a, b=b))
            )
    for key in ("groups", "replicas"):
        if isinstance(data.get(key), list):
            for i, item in enumerate(data[key]):
                _check_exclusive(item, path + (key, i), pos, file, out)


def parse_config(text: str, file: str = "<string>") -> Configuration:
    """Parse one configuration document; raise ConfigError listing every problem."""
    try:
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
    pos = _Positions()
    data = _build(node, (), pos, issues, file)
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
    return config  # type: ignore[return-value]


def load_config(path: str | Path) -> Configuration:
    """Read and parse a configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue(str(p), None, None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            [ConfigIssue(str(p), None, None, "", f"cannot read the file: {e}")]
        ) from None
    return parse_config(text, str(p))
