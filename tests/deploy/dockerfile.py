"""A small Dockerfile reader and runner, so CI can run the image's build steps without a Docker engine.

It understands the instructions our Dockerfile uses (FROM, ARG, ENV, WORKDIR, COPY, RUN, USER, EXPOSE,
VOLUME, HEALTHCHECK, STOPSIGNAL, ENTRYPOINT, CMD), line continuations, comments, and Docker's variable
substitution (`$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR:+word}`) in the instructions where Docker applies
it. RUN lines are handed to `/bin/sh -c` exactly as written, with the stage's ARG and ENV values in the
environment, as Docker does. Absolute paths in WORKDIR and COPY are placed under a scratch root.

Reference: https://docs.docker.com/reference/dockerfile/ (parser directives, ARG scoping, ENV syntax,
`.dockerignore` patterns).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where the instruction starts


@dataclass
class Stage:
    base: str  # the FROM image, unexpanded
    name: str | None  # the `AS name`, if any
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]  # ARGs before the first FROM (usable in FROM and re-declarable)
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}")


def parse(text: str) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments (and parser directives) vanish, even inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"

    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for n, line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert keyword == "ARG", f"line {n}: only ARG may come before FROM, got {keyword}"
            k, eq, v = args.partition("=")
            global_args[k] = v if eq else None
        else:
            stages[-1].instructions.append(Instruction(keyword, args, n))
    return Dockerfile(global_args, stages)


def expand(text: str, env: dict[str, str]) -> str:
    """Docker's substitution for non-RUN instructions; an unset variable is the empty string."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        value = env.get(name, "")
        if m.group("op") == "-":
            return value or m.group("word")
        if m.group("op") == "+":
            return m.group("word") if value else ""
        return value

    return _VAR.sub(sub, text)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    """`ENV A=1 B="x y"` (the key=value form; each value may use the keys set before it)."""
    out: dict[str, str] = {}
    for token in shlex.split(args, posix=True):
        key, eq, value = token.partition("=")
        assert eq, f"ENV {args!r}: use the KEY=value form"
        out[key] = expand(value, {**env, **out})
    return out


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; the shell form is refused on purpose:
    it runs under `/bin/sh -c`, which does not forward SIGTERM to the server."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck(args: str) -> tuple[dict[str, str], list[str]]:
    """`HEALTHCHECK --opt=v ... CMD [...]` → (options, command)."""
    opts_part, sep, cmd = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args!r}"
    opts = dict(o.lstrip("-").split("=", 1) for o in opts_part.split())
    return opts, exec_form(cmd.strip())


# --- .dockerignore ----------------------------------------------------------------------------------


def read_dockerignore(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.lstrip("/") for line in lines if line and not line.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether a context path is excluded (Go filepath.Match per pattern, `**` any depth; a pattern
    excludes a directory's whole subtree; `!` re-includes). Enough for the patterns we write."""
    result = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        candidates = [pat]
        if pat.startswith("**/"):
            candidates.append(pat[3:])
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            result = not negate
    return result


# --- running a stage ----------------------------------------------------------------------------------


@dataclass
class StageRun:
    env: dict[str, str]  # the environment after the stage's ARG/ENV lines
    workdir: Path  # the stage's WORKDIR, under the scratch root
    log: list[str]  # what ran, for failure messages


def run_stage(
    df: Dockerfile,
    stage: Stage,
    *,
    context: Path,
    root: Path,
    build_args: dict[str, str],
    base_env: dict[str, str],
    timeout: float,
) -> StageRun:
    """Run a stage's ARG/ENV/WORKDIR/COPY/RUN lines on this machine. Absolute paths are mapped under
    `root`; COPY honours `.dockerignore` like the build context does."""
    patterns = read_dockerignore(context / ".dockerignore")
    env = dict(base_env)
    root.mkdir(parents=True, exist_ok=True)
    workdir = root  # Docker's default WORKDIR is /
    log: list[str] = []
    for ins in stage.instructions:
        if ins.keyword == "ARG":
            k, eq, v = ins.args.partition("=")
            if k in build_args:
                env[k] = build_args[k]
            elif eq:
                env[k] = expand(v, env)
            elif df.global_args.get(k) is not None:
                env[k] = expand(df.global_args[k] or "", env)
        elif ins.keyword == "ENV":
            env.update(parse_env(ins.args, env))
        elif ins.keyword == "WORKDIR":
            target = expand(ins.args, env)
            workdir = _under(root, target) if target.startswith("/") else workdir / target
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            parts = [expand(p, env) for p in shlex.split(ins.args)]
            assert not any(p.startswith("--") for p in parts), f"line {ins.line}: COPY flags unsupported here"
            *sources, dest = parts
            dest_path = _under(root, dest) if dest.startswith("/") else workdir / dest
            for src in sources:
                rel = src.rstrip("/").removeprefix("./")
                if ignored(rel, patterns):
                    raise AssertionError(f"line {ins.line}: COPY {src}: excluded by .dockerignore")
                _copy(context, rel, dest_path, many=len(sources) > 1 or dest.endswith("/"), patterns=patterns)
            log.append(f"COPY {ins.args}")
        elif ins.keyword == "RUN":
            t0 = time.monotonic()
            proc = subprocess.run(
                ["/bin/sh", "-c", ins.args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode != 0:
                raise AssertionError(
                    f"Dockerfile line {ins.line} failed ({proc.returncode}): RUN {ins.args}\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
                )
            log.append(f"RUN ({time.monotonic() - t0:.1f}s) {ins.args}")
    return StageRun(env, workdir, log)


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _copy(context: Path, rel: str, dest: Path, *, many: bool, patterns: list[str]) -> None:
    src = context / rel
    if not src.exists():
        raise AssertionError(f"COPY {rel}: not in the build context")
    if src.is_dir():

        def skip(directory: str, names: list[str]) -> list[str]:
            base = Path(directory).relative_to(context).as_posix()
            return [n for n in names if ignored(f"{base}/{n}", patterns)]

        shutil.copytree(src, dest, ignore=skip, dirs_exist_ok=True)
    else:
        target = dest / src.name if many or dest.is_dir() else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def clean_env() -> dict[str, str]:
    """The host environment a build step may see: no venv or project settings leak in."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("VPT_")}
