"""docs/sdk.md stays true to the SDK: every ```python block runs as a script against a real vpt-serve
(tests/clients/conftest.py), and the reference is checked against the code: every public method of
`Client` and `AsyncClient` with its signature (found with `inspect`, so a new method or argument cannot
go undocumented), every error class with its type and the server's status for it, the fields of
`RetryPolicy`, and which calls are resent.

The examples' world is the one the top of docs/sdk.md promises, and nothing more: a working directory
holding `pets.safetensors` (an artifact for the server's backbone, labels cat and dog) and `cat.jpg`;
`VPT_URL`, `VPT_API_KEY` (tenant `acme`, whose task `pets` is uploaded) and `VPT_ADMIN_KEY` (`root`,
an admin) in an environment otherwise holding only PATH, HOME and PYTHONPATH. Each block runs alone
(`python <file>` in that directory), so any one of them can be run or fail by itself; the tasks they
leave under `acme` are deleted afterwards (other modules share the live server).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clients
from clients import errors
from clients.client import (
    AsyncClient,
    Client,
    RetryPolicy,
    classify_call,
    delete_call,
    embed_call,
    info_call,
    rollback_call,
    task_call,
    tasks_call,
    upload_call,
)

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "sdk.md"
DOC = DOC_PATH.read_text()
FENCE_LANGUAGES = {"python", "bash", "json", "text"}


def python_blocks() -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```python block, in order."""
    return [
        (DOC[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", DOC, re.S | re.M)
    ]


def section(title: str) -> str:
    """The text of `## title` up to the next `## ` heading."""
    assert f"\n## {title}\n" in DOC, f"docs/sdk.md has no '## {title}' section"
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the markdown tables in `text` whose first cell is `name` in backticks: name → cells."""
    rows = {}
    for line in text.splitlines():
        if m := re.match(r"^\| `([^`]+)` \|(.*)\|$", line):
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def rendered(name: str, obj: object, *, returns: bool = True) -> str:
    """`name(a, b, *, c=None) -> T` from the signature: the form docs/sdk.md's headings take."""
    sig = inspect.signature(obj)  # type: ignore[arg-type]
    parts, star = [], False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    ret = sig.return_annotation  # a string under `from __future__ import annotations`
    ret = ret if isinstance(ret, str) else inspect.formatannotation(ret)
    tail = f" -> {ret}" if returns and sig.return_annotation is not sig.empty else ""
    return f"{name}({', '.join(parts)}){tail}"


def public_methods(cls: type) -> dict[str, object]:
    return {n: f for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def test_every_public_method_is_documented_with_its_signature():
    methods = public_methods(Client)
    assert {"classify", "upload", "close", "health"} <= set(methods)  # found, not an empty pass
    missing = [
        rendered(name, f)
        for cls in (Client, AsyncClient)
        for name, f in public_methods(cls).items()
        if f"`{rendered(name, f)}`" not in DOC
    ]
    for cls in (Client, AsyncClient):
        if f"`{rendered(cls.__name__, cls, returns=False)}`" not in DOC:
            missing.append(rendered(cls.__name__, cls, returns=False))
    assert not missing, f"docs/sdk.md lacks these signatures (as `...`): {missing}"


def test_async_client_has_the_same_methods_as_coroutines():
    """docs/sdk.md documents the methods once, for both clients: hold AsyncClient to that."""
    sync, aio = public_methods(Client), public_methods(AsyncClient)
    assert set(sync) == set(aio), f"only one client has {set(sync) ^ set(aio)}"
    for name, f in aio.items():
        assert inspect.iscoroutinefunction(f), name
        assert rendered(name, f) == rendered(name, sync[name])


def test_every_exported_name_and_the_retry_policy_are_documented():
    for name in clients.__all__:
        assert f"`{name}`" in DOC or f"`{name}(" in DOC, name
    assert f"`{rendered('RetryPolicy', RetryPolicy, returns=False)}`" in DOC
    assert f"`{rendered('parse_error', errors.parse_error, returns=False)}`" in DOC
    retries = section("Retries")
    for f in fields(RetryPolicy):
        assert f"- `{f.name}`:" in retries, f"RetryPolicy.{f.name} is not described under ## Retries"


def sdk_error_classes() -> dict[str, type[errors.VPTError]]:
    found, todo = {}, [errors.VPTError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


def test_error_table_names_every_class_with_its_type_and_the_servers_status():
    from server import errors as server_errors

    rows = table_rows(section("Errors"))
    classes = sdk_error_classes()
    assert set(rows) == set(classes), "the error table must list exactly the SDK's error classes"
    for name, cls in classes.items():
        assert rows[name][0] == f"`{cls.type}`", name
    # The status column says what the server answers for each type.
    todo, statuses = [server_errors.ServingError], {}
    while todo:
        cls = todo.pop()
        statuses[cls.type] = cls.status
        todo += cls.__subclasses__()
    by_type = {cls.type: name for name, cls in classes.items()}
    for type_, status in statuses.items():
        assert str(status) in rows[by_type[type_]][1].split(", "), (type_, status)


def test_retry_table_says_which_calls_are_resent():
    """The table under ## Retries against the flag each call is built with (`_Call.repeatable`)."""
    calls = {
        "classify": classify_call("t", b"x", None, None),
        "embed": embed_call("t", b"x", None),
        "upload": upload_call("t", b"x", None),
        "tasks": tasks_call(100, None, None),
        "task": task_call("t", None),
        "delete": delete_call("t", None),
        "rollback": rollback_call("t", 1, None),
        "info": info_call(),
    }
    # A new method that sends a request must be added here, and to the table.
    sending = set(public_methods(Client)) - {"close", "health"}
    assert set(calls) == sending, f"add to `calls` here and to the table: {sending ^ set(calls)}"
    rows = table_rows(section("Retries"))
    assert set(rows) == set(calls)
    for name, call in calls.items():
        said = rows[name][0].split()[0]
        assert said == ("yes" if call.repeatable else "no"), f"{name}: docs/sdk.md says {said!r}"


def test_every_code_block_is_python_or_plainly_not_run():
    """A ```py or ```python3 block would be skipped silently by the runner below."""
    langs = re.findall(r"^```(\S*)$", DOC, re.M)[::2]  # opening fences
    assert set(langs) <= FENCE_LANGUAGES, f"fences must be one of {FENCE_LANGUAGES}: {set(langs)}"
    assert len(python_blocks()) == langs.count("python") >= 10


@pytest.fixture(scope="module")
def world(live, tmp_path_factory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The working directory and environment the examples assume (docs/sdk.md, top)."""
    work = tmp_path_factory.mktemp("sdk-docs")
    (work / "pets.safetensors").write_bytes(live.artifact(seed=21, C=2, labels=["cat", "dog"]))
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "cat.jpg", quality=95)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "PYTHONPATH": str(ROOT),  # this checkout's clients, whatever is installed
        "VPT_URL": live.url,
        "VPT_API_KEY": live.keys["acme"],
        "VPT_ADMIN_KEY": live.keys["root"],
    }
    with Client(live.url, live.keys["acme"]) as acme:
        before = {t.task_id for t in acme.tasks(limit=1000).tasks}
        acme.upload("pets", work / "pets.safetensors")
        yield work, env
        for t in acme.tasks(limit=1000).tasks:
            if t.task_id not in before:
                acme.delete(t.task_id)


@pytest.mark.integration
@pytest.mark.parametrize("line, code", python_blocks(), ids=[f"line{n}" for n, _ in python_blocks()])
def test_example_runs(world, tmp_path, line, code):
    work, env = world
    script = tmp_path / f"sdk_md_line{line}.py"  # outside `work`: no name of it shadows a module there
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (
        f"docs/sdk.md, the python block at line {line}:\n{code}\n"
        f"--- stdout:\n{proc.stdout}\n--- stderr:\n{proc.stderr}"
    )
