"""``${{ namespace.name }}`` references in configurations, and the resolver that fills them.

dstack resolves each namespace at a different stage (reference/dstack-semantics.md §1.11), so the
parsed model keeps references verbatim and each stage calls :func:`interpolate` with only the
namespaces it owns:

* the client: ``env.*`` (registry_auth, probes) and ``run.args`` (commands), plus ``env`` sentinels;
* the leader at job submission: ``secrets.*`` (env values, registry_auth);
* the agent at job start: ``groups[i].nodes[j].IP_ADDRESS`` (tasks),
  ``groups[i].replicas[j].IP_ADDRESS`` (services) and ``dstack.node_rank``/``job_num``; group
  references are checked at parse time (commands only, within the groups' sizes).

``$${{`` escapes a reference: it is left as ``${{`` and never resolved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KNOWN_NAMESPACES = ("secrets", "env", "run", "dstack", "groups")
_REF = re.compile(r"(\$?)\$\{\{(.*?)\}\}", re.DOTALL)
_NAME = re.compile(
    r"^([a-zA-Z_][a-zA-Z0-9_]*)((?:\[\d+\])?)((?:\.[a-zA-Z_][a-zA-Z0-9_]*(?:\[\d+\])?)*)$"
)


class InterpolationError(ValueError):
    """A reference is malformed or names something that is not there."""


@dataclass(frozen=True, slots=True)
class Reference:
    namespace: str
    name: str  # everything after the namespace, e.g. "HF_TOKEN" or "[0].nodes[1].IP_ADDRESS"

    def __str__(self) -> str:
        sep = "" if self.name.startswith("[") else "."
        return f"{self.namespace}{sep}{self.name}"


def _parse_ref(body: str) -> Reference:
    text = body.strip()
    m = _NAME.match(text)
    if not m:
        raise InterpolationError(
            f"malformed reference ${{{{ {text} }}}}: use ${{{{ namespace.name }}}}"
        )
    ns, index, rest = m.group(1), m.group(2), m.group(3)
    if ns not in KNOWN_NAMESPACES:
        raise InterpolationError(
            f"unknown namespace {ns!r} in ${{{{ {text} }}}}: use one of {', '.join(KNOWN_NAMESPACES)}"
        )
    name = (index + rest) if index else rest.removeprefix(".")
    if not name:
        raise InterpolationError(
            f"reference ${{{{ {text} }}}} names no value: e.g. ${{{{ {ns}.NAME }}}}"
        )
    return Reference(ns, name)


def references(text: str) -> list[Reference]:
    """All unescaped references in ``text``; raises InterpolationError on a malformed one."""
    refs = []
    for m in _REF.finditer(text):
        if m.group(1):
            continue
        refs.append(_parse_ref(m.group(2)))
    if re.search(r"(?<!\$)\$\{\{(?!.*?\}\})", text, re.DOTALL):
        raise InterpolationError("unterminated reference: ${{ needs a closing }}")
    return refs


Lookup = Mapping[str, str] | Callable[[str], str | None]


def interpolate(text: str, namespaces: Mapping[str, Lookup], *, final: bool = False) -> str:
    """Replace references whose namespace is given; leave the others for a later stage.

    Escapes (``$${{``) survive every stage but the ``final`` one, which turns them into a literal
    ``${{`` -- otherwise a later stage would resolve what the user escaped.

    A reference to a given namespace whose name is missing raises InterpolationError naming every
    missing one, so the user fixes them all at once.
    """
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return m.group(0)[1:] if final else m.group(0)
        ref = _parse_ref(m.group(2))
        lookup = namespaces.get(ref.namespace)
        if lookup is None:
            return m.group(0)
        value = lookup(ref.name) if callable(lookup) else lookup.get(ref.name)
        if value is None:
            missing.append(str(ref))
            return m.group(0)
        return value

    out = _REF.sub(sub, text)
    if missing:
        raise InterpolationError(f"not found: {', '.join(missing)}")
    return out


# ``groups[i].nodes[j].IP_ADDRESS`` (tasks) and ``groups[i].replicas[j].IP_ADDRESS`` (services):
# the only names the ``groups`` namespace has (dstack's ``nodes_interpolator``).
_GROUP_IP = re.compile(r"^\[(\d+)\]\.(nodes|replicas)\[(\d+)\]\.IP_ADDRESS$")


def group_refs(text: str, member: str) -> list[tuple[int, int]]:
    """``(i, j)`` of every unescaped ``groups[i].<member>[j].IP_ADDRESS`` in ``text``; raises
    InterpolationError for any other ``groups`` name (a typo, or ``nodes`` in a service)."""
    out = []
    for ref in references(text):
        if ref.namespace != "groups":
            continue
        m = _GROUP_IP.match(ref.name)
        if not m or m.group(2) != member:
            raise InterpolationError(
                f"unknown reference ${{{{ {ref} }}}}: use ${{{{ groups[i].{member}[j].IP_ADDRESS }}}}"
            )
        out.append((int(m.group(1)), int(m.group(3))))
    return out


def check_group_refs(text: str, sizes: Sequence[int], member: str) -> None:
    """Submit-time check of ``text``'s group references against the groups' sizes (nodes of a
    task's groups; the replicas a service's groups start with)."""
    for i, j in group_refs(text, member):
        if i >= len(sizes):
            raise InterpolationError(
                f"${{{{ groups[{i}].{member}[{j}].IP_ADDRESS }}}}: there are {len(sizes)} groups "
                f"(groups[0] to groups[{len(sizes) - 1}])"
            )
        if j >= sizes[i]:
            raise InterpolationError(
                f"${{{{ groups[{i}].{member}[{j}].IP_ADDRESS }}}}: group {i} starts with "
                f"{sizes[i]} {member}"
                + (f" ({member}[0] to {member}[{sizes[i] - 1}])" if sizes[i] else "")
            )


def group_ips(ips: Sequence[Sequence[str]], member: str) -> Callable[[str], str]:
    """The ``groups`` namespace at job start: ``ips[i][j]`` is the address of the j-th node
    (task) or replica (service) of group i, ``""`` while it has none."""

    def lookup(name: str) -> str:
        text = f"${{{{ groups{name} }}}}"
        [(i, j)] = group_refs(text, member)
        check_group_refs(text, [len(g) for g in ips], member)
        if not ips[i][j]:
            raise InterpolationError(
                f"${{{{ groups[{i}].{member}[{j}].IP_ADDRESS }}}} has no address yet: it is not placed"
            )
        return ips[i][j]

    return lookup


def secret_names(config: dict[str, Any]) -> list[str]:
    """Names of the secrets a run configuration (its JSON) references in ``env`` and
    ``registry_auth``."""
    texts: list[str] = []
    env = config.get("env") or {}
    if isinstance(env, dict):
        texts += [v for v in env.values() if isinstance(v, str)]
    elif isinstance(env, list):
        texts += [v for v in env if isinstance(v, str)]
    auth = config.get("registry_auth") or {}
    if isinstance(auth, dict):
        texts += [v for v in auth.values() if isinstance(v, str)]
    names: list[str] = []
    for t in texts:
        try:
            refs = references(t)
        except ValueError:
            continue
        names += [r.name for r in refs if r.namespace == "secrets"]
    return sorted(set(names))
