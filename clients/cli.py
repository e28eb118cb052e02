"""The `vpt` command line (console script `vpt = clients.cli:main`).

Subcommands register themselves through `COMMANDS`: each entry is a function that adds one
sub-parser and sets `func` (called with the parsed namespace, returns the exit status). Heavy imports
(torch, the trainer) happen inside the command that needs them, so `vpt --help` and HTTP-only
commands start fast.

Commands here: `train` (docs/training.md: the VPT paper's recipe, Jia et al., ECCV 2022,
arXiv 2203.12119), `import-official` (prompts trained with KMnP/vpt), `presets` (the `random:`
backbones) and `keygen` (an API key and its tenants-file entry). The commands that talk to a server
over the SDK (`classify`, `upload`, `tasks`, `info`) are in `clients/cli_remote.py`.

Exit status (`EXIT_*`, also in `vpt --help`): 0 ok, 1 an error reported on one line (the server refused
the request, bad data, a failed training run), 2 usage, 3 connection failure, 4 not found, 5 not
authorised, 6 server busy or unavailable after retries, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clients import errors as sdk_errors
from clients.cli_remote import REMOTE_COMMANDS, _table, add_connection_options, upload_with_progress

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


class CliError(Exception):
    """A failure to report as one line on stderr (exit status 1), without a traceback."""


EXIT_OK = 0  # done
EXIT_ERROR = 1  # the server refused the request (4xx/5xx), or a local step failed (bad data, training)
EXIT_USAGE = 2  # bad arguments, or input files that do not exist (argparse's own status)
EXIT_CONNECTION = 3  # the server could not be reached, or the connection failed or timed out
EXIT_NOT_FOUND = 4  # 404: no such task (or version) for this tenant
EXIT_AUTH = 5  # 401 missing/invalid API key, 403 forbidden (e.g. --tenant without the admin role)
EXIT_BUSY = 6  # 429/503/504 still answered after the SDK's retries: try again later
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_HELP = """exit status:
  0  ok
  1  error: the server refused the request, or a local step failed (one line on stderr)
  2  usage: bad arguments, or files that do not exist
  3  connection failure: the server could not be reached (refused, timeout)
  4  not found: no such task (or version) for this tenant
  5  not authorised: missing or invalid API key, or an action your role may not take
  6  busy or unavailable: overloaded/draining/timed out after retries; try again later

environment:
  VPT_URL      server base URL (default http://127.0.0.1:8000)
  VPT_API_KEY  API key (Authorization: Bearer <key>)"""


# ------------------------------------------------------------------------------------------ upload
def _add_upload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("upload (optional)")
    g.add_argument(
        "--upload",
        nargs="?",
        const=True,  # `--upload` alone: the server every other command talks to
        metavar="URL",
        help="PUT the artifact to the server as task --task (as `vpt upload` does); without URL: to "
        "--url, else $VPT_URL, else http://127.0.0.1:8000",
    )
    g.add_argument("--task", metavar="ID", help="task id to upload as (required with --upload)")
    # SUPPRESS (inside add_connection_options): the global `vpt --api-key K train ...` (and --url,
    # --tenant, --timeout) is not overwritten by these options' defaults; given here, after the command,
    # they work too.
    add_connection_options(p, suppress=True)


def _server_url(args: argparse.Namespace) -> str | None:
    """The server `--upload` talks to: its own URL if given one, else --url (None: the SDK's default,
    $VPT_URL, else http://127.0.0.1:8000 - as for every other command)."""
    return args.upload if isinstance(args.upload, str) else args.url


def _maybe_upload(args: argparse.Namespace, data: bytes) -> None:
    """`--upload [URL] --task ID`: the written artifact goes through the SDK exactly as `vpt upload`
    sends it (retries on 429/503, progress bar on a terminal); its errors propagate to `main`, which
    gives them the same one-line message and exit status as `vpt upload`. Prints the task info JSON."""
    if not args.upload:
        return
    from clients.client import Client

    # The global --tenant/--timeout apply too (`vpt --tenant T train ... --upload`).
    with Client(_server_url(args), args.api_key, timeout=args.timeout) as client:
        info = upload_with_progress(
            client, args.task, data, tenant=args.tenant, quiet=getattr(args, "quiet", False)
        )
    print(json.dumps(info.model_dump(), indent=2, ensure_ascii=False))


def _check_upload_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.upload and not args.task:
        p.error("--upload needs --task ID")
    if args.task and not args.upload:
        p.error("--task is only used with --upload [URL]")
    if isinstance(args.upload, str) and not args.upload.startswith(("http://", "https://")):
        # e.g. `--upload FILE`: a value after --upload is taken as its URL
        p.error(f"--upload {args.upload!r}: not a server URL (http://... or https://...)")


# ------------------------------------------------------------------------------------------ train
def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a VPT task (prompts + head) on a frozen backbone and write an artifact",
        description="Train a VPT task with the paper's recipe (SGD momentum 0.9, cosine schedule with "
        "linear warm-up, lr = base lr x batch/256; prompts and head only, backbone frozen in eval mode). "
        "Without --backbone it trains on the server's backbone (asked at --url / $VPT_URL), the one an "
        "upload there must match. See docs/training.md.",
        epilog="example: vpt train --data photos/ --out pets.safetensors --upload --task pets",
    )
    p.add_argument(
        "--backbone",
        metavar="SPEC",
        help="random:<preset>[@seed] (see `vpt presets`), hf-hub:<repo>, or a path (default: the server's, "
        "from GET /v1/info at --url / $VPT_URL)",
    )
    p.add_argument(
        "--data", required=True, metavar="DIR|CSV", help="ImageFolder directory or CSV of path,label"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="artifact to write (.safetensors)")
    p.add_argument("--mode", choices=("deep", "shallow", "linear"), default="deep", help="default: deep")
    p.add_argument(
        "--prompt-length", type=int, default=10, metavar="P", help="prompt tokens per layer (default 10)"
    )
    p.add_argument("--epochs", type=int, default=100, help="default 100 (the paper)")
    p.add_argument("--batch-size", type=int, default=128, help="default 128 (the paper's FGVC configs)")
    p.add_argument(
        "--lr", type=float, default=None, help="base lr at batch 256 (scaled by batch/256); default 1.0"
    )
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-4")
    p.add_argument(
        "--warmup-epochs", type=int, default=None, help="linear warm-up epochs (default: epochs/10)"
    )
    p.add_argument("--prompt-dropout", type=float, default=None, help="default 0.1 for deep, 0 otherwise")
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val-split",
        type=_fraction,
        default=0.1,
        help="fraction held out per class (default 0.1; 0 = none)",
    )
    val.add_argument("--val-dir", metavar="DIR|CSV", help="separate validation images (same labels)")
    p.add_argument(
        "--lr-grid",
        type=float,
        nargs="*",
        metavar="LR",
        help="grid-search these base lrs (no values: the paper's grid)",
    )
    p.add_argument(
        "--wd-grid",
        type=float,
        nargs="*",
        metavar="WD",
        help="grid-search these weight decays (no values: the paper's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, up to 8 on GPU)"
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input side; must match the server's (default: the server's when --backbone is not given, "
        "else the backbone's)",
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="stored tensor dtype"
    )
    p.add_argument(
        "--cache-mb", type=int, default=2048, help="memory for decoded images; beyond it, decode per access"
    )
    p.add_argument("--name", help="display name stored in the artifact")
    p.add_argument("--description", help="free text stored in the artifact")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _add_upload_flags(p)
    p.set_defaults(func=_cmd_train, _parser=p)


def train_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments `vpt train` passes to `vpt.train.job.train_from_paths` (all but
    `on_grid_run`): the `Recipe`, the `RunOptions`, the grid and the data options, from the parsed
    flags. Bad combinations go to `args._parser.error` (exit status 2)."""
    from vpt.train.job import SAVE_DTYPES, default_workers, resolve_device
    from vpt.train.loop import RunOptions
    from vpt.train.recipe import PAPER_LR_GRID, PAPER_WD_GRID, Recipe

    grid = None
    if args.lr_grid is not None or args.wd_grid is not None:
        if args.val_split == 0 and args.val_dir is None:
            args._parser.error("a grid search needs validation data (--val-split > 0 or --val-dir)")
        # A grid flag without values means the paper's grid; so does the flag not given at all.
        grid = (args.lr_grid or list(PAPER_LR_GRID), args.wd_grid or list(PAPER_WD_GRID))
    device = resolve_device(args.device)
    try:
        recipe = Recipe(
            mode=args.mode,
            prompt_length=args.prompt_length,
            epochs=args.epochs,
            batch_size=args.batch_size,
            base_lr=args.lr if args.lr is not None else Recipe.base_lr,
            weight_decay=args.weight_decay if args.weight_decay is not None else Recipe.weight_decay,
            warmup_epochs=args.warmup_epochs if args.warmup_epochs is not None else args.epochs // 10,
            prompt_dropout=args.prompt_dropout,
            seed=args.seed,
        )
    except ValueError as e:
        args._parser.error(str(e))
    opts = RunOptions(
        device=device,
        workers=args.workers if args.workers is not None else default_workers(device),
        save_dtype=SAVE_DTYPES[args.dtype],
        progress=not args.quiet,
    )
    return {
        "backbone_spec": args.backbone,
        "data": args.data,
        "recipe": recipe,
        "opts": opts,
        "out": args.out,
        "val_dir": args.val_dir,
        "val_split": args.val_split,
        "img_size": args.img_size,
        "grid": grid,
        "cache_bytes": args.cache_mb << 20,
        "name": args.name,
        "description": args.description,
    }


def _server_backbone(args: argparse.Namespace) -> tuple[str, int]:
    """The backbone spec and input side of the server `--upload` would send to (`GET /v1/info`): a task
    trained on anything else would be refused there. Errors keep their SDK type (so their exit status)
    and say what was being asked, and what to do instead."""
    from pathlib import Path

    from clients.client import Client

    with Client(_server_url(args), args.api_key, timeout=args.timeout) as client:
        try:
            info = client.info()
        except sdk_errors.ConnectionFailed as e:
            e.message = (
                f"no --backbone given, and the server at {client.url} could not be asked for its backbone "
                f"({e.message}): pass --backbone SPEC (`vpt presets` lists the random: ones), or point "
                "--url / $VPT_URL at a running vpt-serve"
            )
            raise
        except sdk_errors.VPTError as e:
            e.message = f"asking {client.url} for its backbone (no --backbone given): {e.message}"
            raise
        url = client.url
    spec, side = info.backbone.spec, info.backbone.image_size
    if not spec.startswith(("random:", "hf-hub:")) and not Path(spec).exists():
        raise CliError(
            f"the server at {url} runs the backbone {spec!r}, a path that does not exist here: pass "
            "--backbone with a local copy of the same weights"
        )
    print(f"backbone: {spec} at {side}x{side} (the server's, {url})", file=sys.stderr)
    return spec, side


def _cmd_train(args: argparse.Namespace) -> int:
    _check_upload_args(args._parser, args)
    if args.backbone is None:
        args.backbone, side = _server_backbone(args)
        if args.img_size is None:
            args.img_size = side
    from vpt.train.job import train_from_paths

    kwargs = train_arguments(args)

    def on_grid_run(run: Any) -> None:
        res = f"val {100 * run.val_accuracy:.2f}%" if run.status == "ok" else run.status
        print(
            f"grid: base lr {run.base_lr:g} wd {run.weight_decay:g} → {res} ({run.seconds:.1f}s)",
            file=sys.stderr,
        )

    out = train_from_paths(**kwargs, on_grid_run=None if args.quiet else on_grid_run)
    from vpt.train.report import format_report

    print(format_report(out.summary))
    print(f"wrote {args.out}")
    _maybe_upload(args, out.data)
    return 0


# ------------------------------------------------------------------------------------------ import-official
def _add_import_official(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import-official",
        help="convert prompts trained with the official VPT code (KMnP/vpt) into an artifact",
        description="Read an official per-epoch prompt file (prompt_epN.pth) or model checkpoint with "
        "torch.load(weights_only=True) and write a task artifact validated against --backbone. "
        "See docs/training.md.",
    )
    p.add_argument("file", metavar="FILE", help="prompt_epN.pth or a model state dict")
    p.add_argument(
        "--backbone", required=True, metavar="SPEC", help="the backbone the prompts were trained on"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="artifact to write (.safetensors)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--labels", metavar="FILE|a,b,c", help="class names: a file (one per line or JSON) or a list"
    )
    labels.add_argument(
        "--num-classes", type=int, help="check the head has this many classes; labels '0'..'C-1'"
    )
    p.add_argument(
        "--head", metavar="FILE", help="head weights when FILE has none (head.last_layer.weight/bias)"
    )
    p.add_argument(
        "--mode", choices=("deep", "shallow", "linear"), help="expected mode (refused if the file differs)"
    )
    p.add_argument("--img-size", type=int, default=None, help="input side; must match the server's")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="stored tensor dtype"
    )
    p.add_argument("--name", help="display name stored in the artifact")
    p.add_argument("--description", help="free text stored in the artifact")
    _add_upload_flags(p)
    p.set_defaults(func=_cmd_import_official, _parser=p)


def _cmd_import_official(args: argparse.Namespace) -> int:
    _check_upload_args(args._parser, args)
    from pathlib import Path

    from prompt_store.artifact import atomic_write, load_artifact, save_artifact, validate_for_backbone
    from vpt.hub import load_backbone
    from vpt.official import official_to_artifact, read_head, read_official
    from vpt.train.job import SAVE_DTYPES, signature

    task = read_official(args.file)
    head = read_head(args.head) if args.head else None
    bb = load_backbone(args.backbone, img_size=args.img_size)
    sig = signature(bb)
    artifact = official_to_artifact(
        task,
        sig,
        labels=args.labels,
        num_classes=args.num_classes,
        head=head,
        mode=args.mode,
        name=args.name,
        description=args.description,
        source=Path(args.file).name,
    )
    data = save_artifact(artifact, SAVE_DTYPES[args.dtype])
    validate_for_backbone(load_artifact(data), sig)
    atomic_write(args.out, data)
    L, P, D = artifact.prompts.shape
    print(
        f"imported {task.kind} {args.file}: VPT-{task.mode}, prompts ({L}, {P}, {D}), "
        f"{artifact.num_classes} classes; wrote {args.out} ({len(data):,} bytes)"
    )
    _maybe_upload(args, data)
    return 0


# ------------------------------------------------------------------------------------------ presets
def _add_presets(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "presets",
        help="list the random:<preset> backbones (for tests and demos)",
        description="List the ViT presets a `random:<preset>[@seed]` backbone spec may name (vpt.config."
        "PRESETS): random weights, so a server or `vpt train` runs without downloading anything, but "
        "every prediction is meaningless. See docs/backbones.md.",
        epilog="example: VPT_BACKBONE=random:vit_test_tiny bash scripts/serve.sh",
    )
    p.add_argument("--json", action="store_true", help="print each preset's ViTConfig as JSON")
    p.set_defaults(func=_cmd_presets, _parser=p)


def _cmd_presets(args: argparse.Namespace) -> int:
    from vpt.config import PRESETS

    if args.json:
        print(json.dumps({f"random:{n}": c.to_dict() for n, c in PRESETS.items()}, indent=2))
        return 0
    rows = [
        [f"random:{n}", str(c.embed_dim), str(c.depth), str(c.num_heads), str(c.patch_size), str(c.img_size)]
        for n, c in PRESETS.items()
    ]
    print(_table(rows, ["SPEC", "D", "LAYERS", "HEADS", "PATCH", "IMAGE"]))
    return 0


# ------------------------------------------------------------------------------------------ keygen
def _add_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="make an API key and the tenants-file lines for it, or replace a tenant's keys (--rotate)",
        description="Generate a new API key for a tenant. The key is printed once (only its SHA-256 goes "
        "into the tenants file); the server re-reads the file when it changes (or on SIGHUP). A name "
        "the tenants file already has is refused: --rotate replaces that tenant's keys in the file "
        "instead (e.g. a lost admin key). No server is contacted.",
        epilog="examples:\n  vpt keygen --tenant acme\n"
        "  vpt keygen --rotate --tenant admin --tenants-file data/tenants.toml   # a lost admin key",
    )
    p.add_argument("--tenant", required=True, metavar="NAME", help="tenant name: [a-z0-9][a-z0-9._-]{0,63}")
    p.add_argument(
        "--role",
        choices=("tenant", "admin"),
        help="tenant: its own tasks only (default); admin: any tenant's tasks via --tenant",
    )
    p.add_argument(
        "--tenants-file",
        metavar="PATH",
        help="the tenants file: a new name must not be in it; --rotate rewrites it (default: "
        "$VPT_TENANTS_FILE, else ./data/tenants.toml; without --rotate, not checked if it does not exist)",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="give the tenant a new key in place of all its keys, in the tenants file (atomic rewrite, "
        "the rest of the file unchanged); its old keys stop working once the server re-reads the file",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"tenant", "role", "key", "toml"} (--rotate: "tenants_file")',
    )
    p.set_defaults(func=_cmd_keygen, _parser=p)


def _cmd_keygen(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from prompt_store.ids import ID_PATTERN

    if ID_PATTERN.fullmatch(args.tenant) is None:  # checked before the slow import below
        args._parser.error(f"invalid tenant name {args.tenant!r}: use [a-z0-9][a-z0-9._-]{{0,63}}")
    if args.rotate and args.role is not None:
        args._parser.error("--rotate keeps the tenant's role; change it in the tenants file")
    path = Path(args.tenants_file or os.environ.get("VPT_TENANTS_FILE") or "data/tenants.toml")
    if (args.rotate or args.tenants_file) and not path.is_file():
        args._parser.error(f"no tenants file {path}")
    # imported here: it pulls in the store (and torch)
    from server.tenants import TenantsFileError, keygen_line, parse_tenants

    if args.rotate:
        return _rotate_key(args, str(path))
    if path.is_file():
        try:
            existing = parse_tenants(path.read_text(), str(path))
        except TenantsFileError as e:
            raise CliError(f"cannot check the name against {path}: {e}") from None
        if args.tenant in existing:
            raise CliError(
                f"tenant {args.tenant!r} is already in {path}: `vpt keygen --rotate --tenant {args.tenant} "
                f"--tenants-file {path}` replaces its keys, or choose another name"
            )
    role = args.role or "tenant"
    key, toml = keygen_line(args.tenant, role)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "role": role, "key": key, "toml": toml}))
        return 0
    print(f"API key for tenant {args.tenant!r} ({role}); it is shown only now, store it safely:\n")
    print(f"    {key}\n")
    print(f"Add these lines to the tenants file ({path}):\n")
    print(toml, end="")
    return 0


def _rotate_key(args: argparse.Namespace, path: str) -> int:
    from server.tenants import TenantsFileError, admin_key_path, hash_key, rotate_key

    try:
        key, old = rotate_key(path, args.tenant)
    except TenantsFileError as e:
        raise CliError(str(e)) from None
    # The first start's admin-key file would now hold a key that no longer works.
    kept = admin_key_path(path)
    removed = kept.is_file() and hash_key(kept.read_text().strip()) in old.key_hashes
    if removed:
        kept.unlink()
    if args.json:
        print(json.dumps({"tenant": old.name, "role": old.role, "key": key, "tenants_file": str(path)}))
        return 0
    print(f"New API key for tenant {old.name!r} ({old.role}); it is shown only now, store it safely:\n")
    print(f"    {key}\n")
    n = len(old.key_hashes)
    print(f"It replaces the tenant's {n} old key{'s' if n > 1 else ''} in {path}; a running server re-reads")
    print("the file within a second of its next request (or now: kill -HUP <pid>).")
    if removed:
        print(f"Removed {kept}: it held the old key.")
    return 0


# ------------------------------------------------------------------------------------------ main
COMMANDS: list[Register] = [*REMOTE_COMMANDS, _add_train, _add_import_official, _add_presets, _add_keygen]


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs; keeps as written a paragraph whose later lines are indented (a table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines[1:]):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def _finish_help(p: argparse.ArgumentParser) -> None:
    """Every command's --help ends with the exit statuses (recursively: `vpt tasks list --help` too)."""
    p.formatter_class = _HelpFormatter
    if p.epilog is None or "exit status" not in p.epilog:
        p.epilog = f"{p.epilog}\n\n{EXIT_HELP}" if p.epilog else EXIT_HELP
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish_help(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vpt", description="Visual Prompt Tuning: train, import and serve tasks; talk to a vpt-serve."
    )
    add_connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    _finish_help(parser)
    return parser


# Top-level modules of the `server` extra (pyproject.toml). In a client-only install (no torch) a command
# that needs one says what to install instead of showing an ImportError traceback.
SERVER_EXTRA_MODULES = frozenset(
    {
        "torch",
        "numpy",
        "safetensors",
        "huggingface_hub",
        "PIL",
        "fastapi",
        "fastapi_offline",
        "starlette",
        "uvicorn",
        "pydantic_settings",
        "prometheus_client",
        "multipart",
        "python_multipart",
        "boto3",
        "botocore",
        "tomli",
    }
)
SERVER_EXTRA_HINT = "pip install 'vpt-serve[server]' (in a checkout: pip install -e '.[server]')"


def _missing_server_module(e: BaseException) -> str | None:
    """The server-extra module whose absence raised `e`, or None for any other error."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.partition(".")[0]
        if top in SERVER_EXTRA_MODULES:
            return top
    return None


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Domain errors that deserve one line, not a traceback (imported lazily, as the commands are)."""
    errors: list[type[BaseException]] = [CliError, OSError]
    for mod, name in (
        ("vpt.train.data", "DatasetError"),
        ("vpt.train.loop", "TrainingDiverged"),
        ("vpt.official", "OfficialImportError"),
        ("vpt.checkpoint", "CheckpointError"),
        ("prompt_store.errors", "ArtifactError"),
    ):
        module = sys.modules.get(mod)
        if module is not None:
            errors.append(getattr(module, name))
    return tuple(errors)


def exit_status(e: BaseException) -> int | None:
    """The exit status for an error worth one line, or None for a bug (shown with its traceback)."""
    if isinstance(e, sdk_errors.ConnectionFailed):
        return EXIT_CONNECTION
    if isinstance(e, sdk_errors.NotFound):
        return EXIT_NOT_FOUND
    if isinstance(e, sdk_errors.Unauthorized | sdk_errors.Forbidden):
        return EXIT_AUTH
    if isinstance(
        e,
        sdk_errors.Overloaded
        | sdk_errors.Unavailable
        | sdk_errors.StoreUnavailable
        | sdk_errors.DeadlineExceeded,
    ):
        return EXIT_BUSY
    if isinstance(e, sdk_errors.VPTError):
        return EXIT_ERROR
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(e, httpx.TransportError):  # read timeout, dropped connection
        return EXIT_CONNECTION
    if isinstance(e, _expected_errors()) or _missing_server_module(e):
        return EXIT_ERROR
    return None


def _message(e: BaseException, args: argparse.Namespace) -> str:
    missing = _missing_server_module(e)
    if missing:
        return (
            f"this command needs the server's dependencies ({missing} is not installed; this looks like "
            f"a client-only install): {SERVER_EXTRA_HINT}"
        )
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(e, httpx.TransportError):
        return f"connection failed: {type(e).__name__}: {e}"
    if isinstance(e, sdk_errors.Unauthorized):  # the server speaks of headers; say what to set here
        if getattr(args, "api_key", None):
            return f"{e} (from --api-key)"
        if os.environ.get("VPT_API_KEY"):
            return f"{e} (from $VPT_API_KEY)"
        return f"{e}; set VPT_API_KEY=<key> or pass --api-key <key>"
    return str(e)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = getattr(args, "_parser", parser).prog  # "vpt tasks list", "vpt train", ...
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        print(f"{prog}: error: {_message(e, args)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
