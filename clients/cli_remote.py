"""`vpt` subcommands that talk to a running vpt-serve through the SDK (`clients.client.Client`).

`classify`, `upload`, `tasks list|show|delete|rollback` and `info`. Each one reads the connection
options (`--url`, `--api-key`, `--tenant`, `--timeout`) that `clients.cli` adds globally, prints a table
(or JSON with `--json`) on stdout, and lets SDK errors (`clients.errors.VPTError`) propagate: `cli.main`
turns them into one line on stderr and an exit status. Usage mistakes (a file that does not exist, a
glob that matches nothing) go through `parser.error` (exit status 2) before anything is sent.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK (httpx, pydantic) is imported when a command runs, not for `vpt --help`
    from clients.client import Client
    from clients.types import Prediction, ServerInfo, TaskInfo

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
GLOB_CHARS = frozenset("*?[")
BAR_WIDTH = 20


# ------------------------------------------------------------------------------------------ shared
def add_connection_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """`--url`, `--api-key`, `--tenant`, `--timeout`: on `vpt` itself and again on each remote command.

    On the subcommands the defaults are SUPPRESS, so an option given before the command
    (`vpt --url U tasks list`) is not overwritten by the subcommand's default, and one given after it
    (`vpt tasks list --url U`) works too.
    """
    default: Any = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("server connection")
    g.add_argument(
        "--url",
        metavar="URL",
        default=default,
        help="server base URL (default: $VPT_URL, else http://127.0.0.1:8000)",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        default=default,
        help="API key sent as a bearer token (default: $VPT_API_KEY)",
    )
    g.add_argument(
        "--tenant", metavar="NAME", default=default, help="admins: act on this tenant's tasks (?tenant=)"
    )
    g.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        default=argparse.SUPPRESS if suppress else 60.0,
        help="seconds per HTTP request (default 60)",
    )


def _client(args: argparse.Namespace) -> Client:
    from clients.client import Client

    return Client(args.url, args.api_key, timeout=args.timeout)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _bar(score: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `width` cells for a score in [0, 1], in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, score)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# ------------------------------------------------------------------------------------------ classify
def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named on the command line: paths, globs (`*.jpg`, `photos/**/*.png`) or directories (their
    image files, by suffix). Raises ValueError naming the first argument that gives no file."""
    out: list[Path] = []
    for pat in patterns:
        if GLOB_CHARS & set(pat):
            found = sorted(Path(m) for m in glob.glob(pat, recursive=True) if Path(m).is_file())
            if not found:
                raise ValueError(f"no files match {pat!r}")
            out += found
        elif Path(pat).is_dir():
            found = sorted(
                f for f in Path(pat).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(f"no image files in directory {pat!r}")
            out += found
        elif Path(pat).is_file():
            out.append(Path(pat))
        else:
            raise ValueError(f"no such file: {pat!r}")
    return out


def _add_classify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "classify",
        help="classify images with a task (table or --json)",
        description="Classify images with TASK and print the top-k labels per image. FILES may be paths, "
        "globs (quote them to let vpt expand '**') or directories (their image files). Images are sent "
        "in requests of --batch images each.",
        epilog="example: vpt classify pets cat.jpg 'more/*.jpg' --top-k 3",
    )
    p.add_argument("task", metavar="TASK", help="task id")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files, globs or directories")
    p.add_argument("--top-k", "-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        metavar="N",
        help="images per request (default 16; the server caps it)",
    )
    add_connection_options(p, suppress=True)
    p.set_defaults(func=_cmd_classify, _parser=p)


def _cmd_classify(args: argparse.Namespace) -> int:
    from clients.errors import InvalidImage

    if args.top_k < 1 or args.batch < 1:
        args._parser.error("--top-k and --batch must be at least 1")
    try:
        files = expand_inputs(args.files)
    except ValueError as e:
        args._parser.error(str(e))
    results: list[tuple[Path, int, list[Prediction]]] = []
    server_ms = 0.0
    start = time.perf_counter()
    with _client(args) as client:
        for i in range(0, len(files), args.batch):
            chunk = files[i : i + args.batch]
            try:
                res = client.classify(args.task, chunk, top_k=args.top_k, tenant=args.tenant)
            except InvalidImage as e:
                raise _name_image(e, chunk) from None
            server_ms += res.timings.total_ms
            results += [(f, res.version, preds) for f, preds in zip(chunk, res.predictions, strict=True)]
    wall_ms = 1000 * (time.perf_counter() - start)
    if args.json:
        _print_json(
            {
                "task_id": args.task,
                "results": [
                    {"file": str(f), "version": v, "predictions": [p.model_dump() for p in preds]}
                    for f, v, preds in results
                ],
            }
        )
        return 0
    rows = []
    for f, _, preds in results:
        for j, pr in enumerate(preds):
            rows.append([str(f) if j == 0 else "", pr.label, f"{pr.score:.3f}", _bar(pr.score)])
    print(_table(rows, ["FILE", "LABEL", "SCORE", ""]))
    versions = sorted({v for _, v, _ in results})
    print(
        f"task {args.task} v{','.join(map(str, versions))} · {len(files)} image(s) · "
        f"{wall_ms:.0f} ms round trip, {server_ms:.0f} ms on the server",
        file=sys.stderr,
    )
    return 0


def _name_image(e: Any, chunk: list[Path]) -> Any:
    """The server says `image N: ...` (N within the request); name the file instead."""
    head, sep, rest = e.message.partition(": ")
    if sep and head.startswith("image ") and head[6:].isdigit() and int(head[6:]) < len(chunk):
        return type(e)(f"{chunk[int(head[6:])]}: {rest}", status=e.status)
    return e


# ------------------------------------------------------------------------------------------ upload
class ProgressBody:
    """An artifact body that reports progress as httpx streams it.

    Re-iterable (not a generator), so the SDK's retry on 429/503 can send it again; each pass starts
    by calling `on_start` (to reset the bar) and calls `on_chunk(n)` after each chunk is handed over.
    """

    def __init__(
        self, data: bytes, on_start: Callable[[], None], on_chunk: Callable[[int], None], chunk: int = 1 << 16
    ) -> None:
        self.data, self.on_start, self.on_chunk, self.chunk = data, on_start, on_chunk, chunk

    def __iter__(self) -> Iterator[bytes]:
        self.on_start()
        view = memoryview(self.data)
        for i in range(0, len(self.data), self.chunk):
            piece = bytes(view[i : i + self.chunk])
            yield piece
            self.on_chunk(len(piece))


def upload_with_progress(
    client: Client, task: str, data: bytes, *, tenant: str | None, quiet: bool = False
) -> TaskInfo:
    """`client.upload`, with the body streamed through a tqdm bar on stderr (shown on a terminal)."""
    from tqdm import tqdm

    from clients.client import upload_call

    call = upload_call(task, data, tenant)
    with tqdm(
        total=len(data),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"upload {task}",
        file=sys.stderr,
        disable=True if quiet else None,  # None: only on a terminal
        leave=False,
    ) as bar:
        call.content = ProgressBody(data, bar.reset, bar.update)  # type: ignore[assignment]
        call.headers["content-length"] = str(len(data))  # not chunked: the server checks the size first
        return client._send(call)


def _add_upload(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "upload",
        help="upload a task artifact (creates the task or adds a version)",
        description="PUT a vpt-task/1 artifact (.safetensors, e.g. from `vpt train`) as TASK. The server "
        "validates it against its backbone; a new upload of an existing task becomes its new current "
        "version (older ones stay for `vpt tasks rollback`).",
        epilog="example: vpt upload pets pets.safetensors",
    )
    p.add_argument("task", metavar="TASK", help="task id: [a-z0-9][a-z0-9._-]{0,63}")
    p.add_argument("file", metavar="FILE", help="the artifact (.safetensors)")
    p.add_argument("--json", action="store_true", help="print the task info as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_connection_options(p, suppress=True)
    p.set_defaults(func=_cmd_upload, _parser=p)


def _cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        args._parser.error(f"no such file: {args.file!r}")
    data = path.read_bytes()
    with _client(args) as client:
        info = upload_with_progress(client, args.task, data, tenant=args.tenant, quiet=args.quiet)
    if args.json:
        _print_json(info.model_dump())
        return 0
    what = "created" if len(info.versions) == 1 else "new version of"
    print(
        f"{what} {info.tenant}/{info.task_id}: version {info.version}, VPT-{info.mode} "
        f"P={info.prompt_length}, {info.num_classes} classes, {_size(info.size)}"
    )
    return 0


# ------------------------------------------------------------------------------------------ tasks
def _add_tasks(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tasks",
        help="list, show, delete or roll back tasks",
        description="Manage the tenant's tasks (an admin's with --tenant NAME).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = actions.add_parser("list", help="list tasks", description="List the tenant's tasks.")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--limit", type=int, metavar="N", help="at most N tasks (default: all, page by page)")
    add_connection_options(ls, suppress=True)
    ls.set_defaults(func=_cmd_tasks_list, _parser=ls)

    show = actions.add_parser(
        "show", help="show one task", description="Show a task: labels, versions, usage."
    )
    show.add_argument("task", metavar="TASK")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(show, suppress=True)
    show.set_defaults(func=_cmd_tasks_show, _parser=show)

    rm = actions.add_parser(
        "delete", help="delete a task", description="Delete a task and every version of it."
    )
    rm.add_argument("task", metavar="TASK")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask (asked only on a terminal)")
    add_connection_options(rm, suppress=True)
    rm.set_defaults(func=_cmd_tasks_delete, _parser=rm)

    rb = actions.add_parser(
        "rollback",
        help="make a retained version current",
        description="Make VERSION (see `vpt tasks show TASK`) the task's current version.",
    )
    rb.add_argument("task", metavar="TASK")
    rb.add_argument("version", type=int, metavar="VERSION")
    rb.add_argument("--json", action="store_true", help="print the task info as JSON")
    add_connection_options(rb, suppress=True)
    rb.set_defaults(func=_cmd_tasks_rollback, _parser=rb)


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        args._parser.error("--limit must be at least 1")
    tasks: list[TaskInfo] = []
    cursor = None
    with _client(args) as client:
        while True:
            want = 1000 if args.limit is None else min(1000, args.limit - len(tasks))
            page = client.tasks(limit=want, cursor=cursor, tenant=args.tenant)
            tasks += page.tasks
            cursor = page.next_cursor
            if cursor is None or (args.limit is not None and len(tasks) >= args.limit):
                break
    if args.json:
        _print_json([t.model_dump(exclude={"usage"}) for t in tasks])
        return 0
    if not tasks:
        print("no tasks", file=sys.stderr)
        return 0
    rows = [
        [
            t.task_id,
            f"v{t.version}",
            t.mode,
            str(t.prompt_length),
            str(t.num_classes),
            _size(t.size),
            _when(t.created),
            t.name or "",
        ]
        for t in tasks
    ]
    print(_table(rows, ["TASK", "VERSION", "MODE", "P", "CLASSES", "SIZE", "UPDATED", "NAME"]))
    return 0


def _labels(labels: list[str], shown: int = 20) -> str:
    if len(labels) <= shown:
        return ", ".join(labels)
    return ", ".join(labels[:shown]) + f", … ({len(labels) - shown} more; --json lists all)"


def _show(t: TaskInfo) -> str:
    lines = [
        f"task         {t.tenant}/{t.task_id}",
        f"name         {t.name or '-'}",
        f"version      {t.version} (retained: {', '.join(str(v.version) for v in t.versions)})",
        f"mode         VPT-{t.mode}, {t.prompt_length} prompt tokens",
        f"classes      {t.num_classes}: {_labels(t.labels)}",
        f"backbone     {t.backbone} ({t.backbone_fingerprint[:20]}…)",
        f"size         {_size(t.size)}, uploaded {_when(t.created)}",
    ]
    if t.description:
        lines.insert(2, f"description  {t.description}")
    if t.usage is not None:
        lines.append(
            f"usage        {t.usage.requests} requests, {t.usage.images} images, {t.usage.errors} errors "
            "(this replica)"
        )
    return "\n".join(lines)


def _cmd_tasks_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.task(args.task, tenant=args.tenant)
    if args.json:
        _print_json(info.model_dump())
    else:
        print(_show(info))
    return 0


def _cmd_tasks_delete(args: argparse.Namespace) -> int:
    if not args.yes and sys.stdin.isatty():
        answer = input(f"delete task {args.task} and all its versions? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    with _client(args) as client:
        client.delete(args.task, tenant=args.tenant)
    print(f"deleted {args.task}")
    return 0


def _cmd_tasks_rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.rollback(args.task, args.version, tenant=args.tenant)
    if args.json:
        _print_json(info.model_dump())
    else:
        print(f"{info.tenant}/{info.task_id}: version {info.version} is current")
    return 0


# ------------------------------------------------------------------------------------------ info
def _add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "info",
        help="show the server's backbone, preprocessing and limits",
        description="Show GET /v1/info: the backbone (train tasks on the same spec), image size, "
        "normalisation, limits and the prompt bank.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p, suppress=True)
    p.set_defaults(func=_cmd_info, _parser=p)


def _limit(name: str, value: float) -> str:
    if name.endswith("_bytes"):
        return f"{name}={_size(int(value))}"
    return f"{name}={int(value):,}" if float(value).is_integer() else f"{name}={value:g}"


def _info_text(url: str, info: ServerInfo) -> str:
    b = info.backbone
    backbone = b.backbone_id if b.spec == b.backbone_id else f"{b.backbone_id} (spec {b.spec})"
    limits = textwrap.wrap(", ".join(_limit(k, v) for k, v in info.limits.items()), 90)
    return "\n".join(
        [
            f"server       {url} (vpt-serve {info.version})",
            f"backbone     {backbone}",
            f"fingerprint  {b.fingerprint}",
            f"model        D={b.embed_dim}, {b.depth} layers, {b.num_heads} heads, patch {b.patch_size}",
            f"images       {b.image_size}x{b.image_size} (resize {b.resize_size}), mean {b.mean}, std {b.std}",
            f"device       {b.device} / {b.dtype}, batching {info.batching}",
            f"bank         {info.bank.get('resident', 0)} of {info.bank.get('capacity', 0)} task slots resident",
            *(f"{'limits' if i == 0 else '':13}{line}" for i, line in enumerate(limits)),
        ]
    )


def _cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
        url = client.url
    if args.json:
        _print_json(info.model_dump())
    else:
        print(_info_text(url, info))
    return 0


REMOTE_COMMANDS = [_add_classify, _add_upload, _add_tasks, _add_info]
