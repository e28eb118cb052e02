"""`vpt-serve`'s exit statuses (also in `vpt-serve --help` and docs/troubleshooting.md), shared by the
supervisor and the processes it starts."""

from __future__ import annotations

import sys

EXIT_OK = 0  # stopped by SIGTERM/SIGINT after a clean drain
EXIT_ENGINE_DIED = 1  # the engine (core) died while serving: a supervisor restarts the server
EXIT_USAGE = 2  # bad flags (argparse's own status)
EXIT_STARTUP_FAILED = 3  # start-up failed otherwise (uvicorn's STARTUP_FAILURE): the log says why
EXIT_BACKBONE_UNAVAILABLE = 4  # no Hub within reach and no cached copy, unknown repo, no such path

EXIT_HELP = """exit status:
  0  stopped by SIGTERM/SIGINT after draining
  1  the engine or the engine-core process died while serving, or API servers kept dying
     (restart the server)
  2  usage
  3  start-up failed (e.g. the port is taken, or no server packages; the log says why)
  4  the backbone is unavailable: no Hub within reach and no cached copy, or no such path;
     set VPT_BACKBONE to a local checkpoint or random:<preset> (docs/troubleshooting.md)"""


def report_unavailable(spec: str, reason: str, ways_out: tuple[str, ...] | list[str]) -> None:
    """One message instead of a traceback: the backbone cannot be loaded, and the two ways out."""
    print(
        f"vpt-serve: error: cannot load the backbone {spec}: {reason}.\n"
        "Set VPT_BACKBONE (or --backbone) to either\n"
        f"  - {ways_out[0]}, e.g. VPT_BACKBONE=/models/imagenet21k_ViT-B_16.npz\n"
        f"  - {ways_out[1]}, e.g. VPT_BACKBONE=random:vit_test_tiny\n"
        f"See docs/troubleshooting.md. Exit status {EXIT_BACKBONE_UNAVAILABLE}; "
        "VPT_LOG_LEVEL=debug shows the traceback.",
        file=sys.stderr,
        flush=True,
    )
