"""Configuration errors: every problem of a file at once, each located and explained."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: where (file, 1-based line and column, field path), what, and a hint."""

    file: str
    line: int | None
    col: int | None
    path: str
    message: str
    suggestion: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        text = f"{where}: {self.path + ': ' if self.path else ''}{self.message}"
        if self.suggestion:
            text += f" (did you mean {self.suggestion!r}?)"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "path": self.path,
            "message": self.message,
            "suggestion": self.suggestion,
        }


@dataclass
class ConfigError(Exception):
    """A configuration that cannot be used; ``issues`` lists every problem found."""

    issues: list[ConfigIssue] = field(default_factory=list)

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} in configuration"
        return head + ":\n" + "\n".join(f"  {issue}" for issue in self.issues)


class RuleError(ValueError):
    """A cross-field rule broken inside a model validator; ``field`` says where to point."""

    def __init__(self, field: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.field = field
