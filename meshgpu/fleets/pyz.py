"""The agent as one file: a shiv zipapp (``dist/meshgpu.pyz``) of meshgpu and its dependencies
for this platform, run by a system Python >= 3.11 (``python3 meshgpu.pyz agent ...``).

It is built from what is *installed* here -- the meshgpu packages this interpreter imports and
the distributions they require, copied file by file -- so building needs no package index: a
running agent can make the file for a new host from its own installation (``agent_file``), or
hand on the file it runs from. shiv (a well-kept packer) writes the zipapp; at its first start
the file unpacks itself under ``SHIV_ROOT`` (the fleet installs it beside the file).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import meshgpu

log = logging.getLogger(__name__)

PACKAGES = ("meshgpu", "consensus", "plugins")  # this project's top-level packages
SKIP_DIRS = {"__pycache__"}
# Declared dependencies no module of the agent imports yet, left out of the file (a third of
# its unpacked size, which every new host unpacks on its first start): apache-libcloud is for
# the cloud backends (plugins/), which bring it when they land.
EXCLUDE = {"apache-libcloud"}


class BuildError(RuntimeError):
    """The agent file cannot be built here; the message says what to do."""


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _requirements(dist: str, seen: set[str]) -> None:
    """``dist`` and every distribution it requires (no extras), by normalized name."""
    from packaging.requirements import Requirement

    key = re.sub(r"[-_.]+", "-", dist).lower()
    if key in seen:
        return
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        return  # an optional platform dependency absent here: the agent copes without it
    seen.add(key)
    for text in d.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        _requirements(req.name, seen)


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def stage(site: Path) -> None:
    """Copy meshgpu's packages and its dependencies' installed files into ``site``."""
    root = Path(meshgpu.__file__).resolve().parent.parent
    for pkg in PACKAGES:
        if (root / pkg).is_dir():
            _copy_tree(root / pkg, site / pkg)
    deps: set[str] = set()
    try:
        requires = md.distribution("meshgpu").requires or []
    except md.PackageNotFoundError:
        raise BuildError("meshgpu is not installed here (pip install -e .)") from None
    from packaging.requirements import Requirement

    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if re.sub(r"[-_.]+", "-", req.name).lower() in EXCLUDE:
            continue
        _requirements(req.name, deps)
    for name in sorted(deps):
        d = md.distribution(name)
        for f in d.files or []:
            parts = Path(f).parts
            if not parts or parts[0] == ".." or SKIP_DIRS & set(parts) or f.suffix == ".pyc":
                continue  # scripts in bin/, caches
            src = Path(d.locate_file(f))
            if not src.is_file():
                continue
            out = site / f
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    (site / "meshgpu" / "_build.json").write_text(
        json.dumps({"version": meshgpu.__version__, "python": python_tag()})
    )


def build(out: Path, python: str = "/usr/bin/env python3") -> Path:
    """Write the agent file to ``out`` (atomically) and return it."""
    try:
        import shiv  # noqa: F401
    except ImportError:
        raise BuildError(
            "shiv is not installed: pip install 'meshgpu[test]' (or shiv), or give the agent "
            "a built file with MESHGPU_AGENT_PYZ"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="meshgpu-pyz-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        stage(site)
        part = out.with_name(out.name + f".part{os.getpid()}")
        cmd = [
            sys.executable,
            "-m",
            "shiv",
            "--site-packages",
            str(site),
            "-e",
            "meshgpu.cli:main",
            "-p",
            python,
            "--compressed",
            "--reproducible",
            "--no-modify",
            "-o",
            str(part),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            part.unlink(missing_ok=True)
            raise BuildError(f"shiv failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        try:
            add_bytecode(part, site)
        except (OSError, zipfile.BadZipFile) as e:
            part.unlink(missing_ok=True)
            raise BuildError(f"cannot add the bytecode to {part}: {e}") from None
        os.replace(part, out)
    return out


# What the agent imports as it starts (``python3 meshgpu.pyz agent ...``): the modules whose
# bytecode the file carries.
STARTUP_MODULES = ("meshgpu.cli._app", "meshgpu.cli._agent", "meshgpu.agent", "meshgpu.api.app")


def startup_files(site: Path) -> list[Path]:
    """The source files of the modules the agent imports at start, found by importing them
    from ``site`` alone (``-I -S``: nothing of this installation leaks in); every module when
    that fails."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        f"for m in {STARTUP_MODULES!r}: __import__(m)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    root = site.resolve()
    if r.returncode != 0:
        log.warning("cannot list the agent's startup modules (all compiled): %s", r.stderr[-500:])
        return sorted(root.rglob("*.py"))
    found = {Path(line).resolve() for line in r.stdout.splitlines() if line.endswith(".py")}
    return sorted(p for p in found if p.is_relative_to(root))


def add_bytecode(archive: Path, site: Path) -> int:
    """Add the compiled bytecode of the modules the agent imports at start to the zipapp (shiv
    leaves .pyc out): a new host then starts without compiling ~800 modules (the agent's cold
    start to "ready": 1.4 s instead of 2.4 s on an idle 2-core box); a module imported later
    compiles there as usual. The .pyc are
    *unchecked-hash* ones: valid whatever the unpacked sources' mtimes (unpacking does not keep
    them), and tagged with this Python's version (``cpython-3XY``): another Python ignores
    them. How many were added."""
    import importlib.util
    import py_compile

    n = 0
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as z:
        for src in startup_files(site):
            cfile = Path(importlib.util.cache_from_source(str(src)))
            try:
                py_compile.compile(
                    str(src),
                    cfile=str(cfile),
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
            except py_compile.PyCompileError:
                continue  # compiled (or reported) where it is imported
            info = zipfile.ZipInfo(
                "site-packages/" + cfile.relative_to(site.resolve()).as_posix(),
                (1980, 1, 1, 0, 0, 0),
            )
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16  # shiv restores these permissions
            z.writestr(info, cfile.read_bytes())
            n += 1
    return n


def running_file() -> Path | None:
    """The zipapp this process runs from, if any."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.is_file() and zipfile.is_zipfile(argv0):
        return argv0.resolve()
    return None


def file_info(path: Path) -> dict[str, str]:
    """What a built file says about itself (version, Python); empty when it does not say."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in ("site-packages/meshgpu/_build.json",):
                if name in z.namelist():
                    return json.loads(z.read(name))
    except (OSError, zipfile.BadZipFile, ValueError):
        pass
    return {}


def agent_file(cache_dir: Path) -> Path:
    """The file a new host gets: ``MESHGPU_AGENT_PYZ`` when set, else the file this agent runs
    from, else one built once from this installation into ``cache_dir``."""
    env = os.environ.get("MESHGPU_AGENT_PYZ")
    if env:
        p = Path(env)
        if not p.is_file():
            raise BuildError(f"MESHGPU_AGENT_PYZ={env} is not a file")
        return p
    own = running_file()
    if own is not None:
        return own
    cached = cache_dir / f"meshgpu-{meshgpu.__version__}-py{python_tag()}.pyz"
    if not cached.is_file():
        log.info("building the agent file %s from this installation", cached)
        build(cached)
    return cached


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("dist/meshgpu.pyz")
    try:
        path = build(out)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{path} ({path.stat().st_size} bytes, meshgpu {meshgpu.__version__}, python {python_tag()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
