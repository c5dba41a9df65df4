"""A process job's environment, as dstack sets one up before the commands run (reference §1.1,
§2): the repo in place, the ``files`` mappings placed, the working directory made and entered,
and for ``python: X.Y`` a virtual environment made with that interpreter and activated.

``layout`` says where everything goes on this host; ``prologue`` is the POSIX shell text that
puts it there. The prologue is the job's first command: it runs as the job's user, in the job's
sandbox (mount namespace included), with its output in the job's log, and a step that fails ends
the job with the reason on its last line. Activation needs no shell: ``PATH`` and
``VIRTUAL_ENV`` are in the job's environment from the start (so SSH sessions get them too).

Where things are (``W`` = the job's workspace, ``ProcessRunner.work_dir``):

- working directory: ``working_dir`` (absolute; ``~`` is the job's ``HOME``), else ``W``;
- the repo: ``repos[0].path`` (relative: under the working directory; ``.`` by default = the
  working directory). Without ``repos`` the uploaded directory is the repo, at ``W``;
- the uploaded archive is unpacked at ``W`` when the repo lands there (the common case: nothing
  to move), else in ``<W>/../code`` and moved into place by the prologue;
- ``files`` come in the archive under ``.meshgpu/files/<n>`` and are copied to their ``path``
  (relative: under the working directory): a directory merges into an existing one, a file
  replaces one. A target the job user cannot write fails the job, naming it;
- the venv: ``<W>/../venv`` (beside the workspace, never inside the user's tree).
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from pathlib import Path

from meshgpu.client.upload import FILES_PREFIX
from meshgpu.config.spec import RunSpec

RESERVED = ".meshgpu"  # the archive's reserved top-level directory (never the user's code)


@dataclass(frozen=True, slots=True)
class Layout:
    workspace: str
    working_dir: str  # where the commands run (DSTACK_WORKING_DIR)
    repo_dir: str | None  # where the repo is (DSTACK_REPO_DIR); None: no repo, nothing uploaded
    code_root: str  # where the uploaded archive is unpacked (as the job sees it)
    venv_dir: str | None  # DSTACK_VENV_DIR (``python:`` only)
    home: str  # what ``~`` is in ``working_dir``, ``repos`` and ``files`` paths
    host_code_root: str = ""  # ``code_root`` on the host (differs in a container)
    container: bool = False


def _resolve(path: str, base: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(base, path))


def layout(
    spec: RunSpec,
    workspace: str | Path,
    home: str | None,
    has_code: bool,
    mount: str | None = None,
) -> Layout:
    """Where the job's working directory, repo, code and venv are. ``mount``: where a
    container sees the workspace (``/workflow``): the paths are then the container's, and the
    code is staged inside the workspace (the one directory the container shares with the host);
    ``~`` is left to the container (its ``HOME``)."""
    host_work = str(workspace)
    work = mount or host_work
    home = home or work
    working_dir = _resolve(spec.working_dir, work, home) if spec.working_dir else work
    repo = spec.repo
    if repo is not None:
        repo_dir: str | None = _resolve(repo.path or ".", working_dir, home)
    else:
        repo_dir = work if has_code else None
    local = repo is None or repo.local_path is not None
    if local and repo_dir == work:
        code_root, host_code = work, host_work
    elif mount:
        code_root = posixpath.join(work, RESERVED, "code")
        host_code = posixpath.join(host_work, RESERVED, "code")
    else:
        code_root = host_code = str(Path(work).parent / "code")
    venv = str(Path(work).parent / "venv") if spec.python and not mount else None
    return Layout(work, working_dir, repo_dir, code_root, venv, home, host_code, bool(mount))


def needs_prologue(spec: RunSpec, place: Layout) -> bool:
    """Is there anything to do before the commands (a container enters its working directory
    through the runtime's ``-w``)?"""
    return bool(
        (spec.python and not place.container)
        or spec.files
        or (spec.working_dir and not place.container)
        or (spec.repo is not None and (spec.repo.url or place.code_root != place.repo_dir))
    )


_HELPERS = r"""_mg_fail() { echo "meshgpu: $*" >&2; exit 1; }
_mg_empty() { [ ! -d "$1" ] || [ -z "$(ls -A "$1" 2>/dev/null | grep -vx '\.meshgpu')" ]; }
_mg_move_into() {
  mkdir -p "$2" || return 1
  for _mg_f in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$_mg_f" ] || [ -L "$_mg_f" ] || continue
    [ "${_mg_f##*/}" = .meshgpu ] && continue
    mv -f "$_mg_f" "$2"/ || return 1
  done
}
_mg_put() {
  if [ -d "$1" ]; then
    mkdir -p "$2" 2>/dev/null && cp -Rp "$1"/. "$2"/
  else
    mkdir -p "$(dirname "$2")" 2>/dev/null; cp -p "$1" "$2"
  fi
}"""


def prologue(
    spec: RunSpec,
    place: Layout,
    *,
    interpreter: str | None = None,
    uv: str | None = None,
    git: str | None = None,
    has_code: bool = False,
) -> str:
    """The shell text that sets the job's environment up (see the module docstring); run by the
    job's shell before its commands, in the same shell (its ``cd`` stays)."""
    q = shlex.quote
    lines = [_HELPERS]
    repo, R = spec.repo, place.repo_dir
    if repo is not None and R is not None:
        busy = {
            "error": f"_mg_fail {q(f'repos: {R} is not empty (if_exists: error; use if_exists: skip to keep it)')}",
            "skip": f"echo {q(f'meshgpu: repos: {R} is not empty; left as it is (if_exists: skip)')}",
        }[repo.if_exists if repo.if_exists in ("error", "skip") else "error"]
        if repo.url:
            gitcmd = q(git or "git")
            clone = [gitcmd, "clone", "-q"]
            if repo.branch:
                clone += ["--branch", q(repo.branch)]
            clone.append(
                "--single-branch" if repo.single_branch and not repo.hash else "--no-single-branch"
            )
            clone += ["--", q(repo.url), q(R)]
            steps = [
                f"command -v {gitcmd} >/dev/null || "
                f"_mg_fail {q(f'repos: cloning {repo.url} needs git, which is not installed')}",
                f"mkdir -p {q(R)} || _mg_fail {q(f'repos: cannot create {R}')}",
                f"{' '.join(clone)} || _mg_fail {q(f'repos: git clone {repo.url} failed')}",
            ]
            if repo.hash:
                steps.append(
                    f"{gitcmd} -C {q(R)} checkout -q {q(repo.hash)} || "
                    f"_mg_fail {q(f'repos: {repo.url} has no commit {repo.hash}')}"
                )
            lines.append(
                f"if _mg_empty {q(R)}; then\n  " + "\n  ".join(steps) + f"\nelse\n  {busy}\nfi"
            )
        elif has_code and place.code_root != R:
            lines.append(
                f"if _mg_empty {q(R)}; then\n"
                f"  _mg_move_into {q(place.code_root)} {q(R)} || "
                f'_mg_fail {q(f"repos: cannot move the repo to {R} as")} "$(id -un)"\n'
                f"else\n  {busy}\nfi"
            )
    files_root = posixpath.join(place.code_root, FILES_PREFIX)
    for n, f in enumerate(spec.files):
        target = _resolve(f.path, place.working_dir, place.home)
        src = posixpath.join(files_root, str(n))
        missing = f"files: {f.local_path} was not uploaded with the run"
        fail = f"files: cannot place {f.local_path} at {target} as"
        lines.append(
            f"[ -e {q(src)} ] || _mg_fail {q(missing)}\n"
            f'_mg_put {q(src)} {q(target)} || _mg_fail {q(fail)} "$(id -un)" '
            f"{q('(not writable there: map it under the working directory)')}"
        )
    if has_code:
        lines.append(f"rm -rf {q(posixpath.join(place.code_root, RESERVED))}")
        if place.code_root != place.workspace:
            lines.append(f"rm -rf {q(place.code_root)}")
        if place.container:
            lines.append(f"rmdir {q(posixpath.join(place.workspace, RESERVED))} 2>/dev/null")
    wd = place.working_dir
    lines.append(
        f"mkdir -p {q(wd)} && cd {q(wd)} || _mg_fail {q(f'working_dir: cannot enter {wd}')}"
    )
    if spec.python and place.venv_dir:
        venv = place.venv_dir
        interp = interpreter or f"python{spec.python}"
        make = (
            f"{q(uv)} venv -q --seed --python {q(interp)} {q(venv)}"
            if uv
            else f"{q(interp)} -m venv {q(venv)}"
        )
        lines.append(
            f"[ -x {q(venv + '/bin/python')} ] || {make} || "
            f"_mg_fail {q(f'python: cannot make a Python {spec.python} venv at {venv}')}"
        )
    lines.append("unset -f _mg_fail _mg_empty _mg_move_into _mg_put; unset _mg_f")
    return "{\n" + "\n".join(lines) + "\n}"
