"""The README's "Quick start", run as a user would type it, so it stays true (issue F).

Its first block (`bash scripts/serve.sh`) runs as written (when the tests run in this checkout's `.venv`,
as `scripts/test.sh` sets them up; else `python -m server` stands in) with the embedded defaults, on its
first run (no tenants file yet, so it creates one and prints the admin key), but on a random tiny
backbone (`VPT_BACKBONE`): nothing can be downloaded here. The other blocks run in order in one
bash session (a python block as `python - <<'PY'`), in a folder holding the files the examples name
(`photos/<class>/*.png`, `cat.jpg`, `more/*.jpg`, a `.venv` link to the tests' environment). Substituted, and
nothing else: the key placeholder `vpt_...` by the printed key, and the server URL by the test server's (in
the text and as VPT_URL, as the default URL would be). `vpt train` names no backbone: it trains on the
server's, which is why the quick start runs here as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.server.helpers import BACKBONE_SPEC
from tests.server.server_proc import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_URL = "http://127.0.0.1:8000"
MARK = "=== README block {} ==="


def quick_start() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the "Quick start" section, in order."""
    text = README.read_text()
    assert "\n## Quick start\n" in text, "README.md has no '## Quick start' section"
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w+)\n(.*?)^```", section, re.S | re.M)


def test_readme_keeps_the_two_commands_and_a_runnable_quick_start():
    text = README.read_text()
    assert "```bash\nbash scripts/serve.sh\n```" in text and "```bash\nbash scripts/test.sh\n```" in text
    blocks = quick_start()
    assert blocks[0] == ("bash", "bash scripts/serve.sh\n")
    assert {lang for lang, _ in blocks} == {"bash", "python"}  # every block is run below
    code = "".join(c for _, c in blocks)
    for needed in ("vpt train ", "--upload --task ", "vpt classify ", "from clients import Client", "curl "):
        assert needed in code, needed
    assert "--backbone" not in code and "hf-hub:" not in code  # the server's backbone: nothing to download


def write_files(work: Path) -> None:
    """The user's files: two classes of small photos, and images to classify."""
    rng = np.random.default_rng(0)
    tints = {"cat": (200, 120, 60), "dog": (60, 110, 200)}
    for label, tint in tints.items():
        (work / "photos" / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(tint, 40, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(work / "photos" / label / f"{i}.png")
    (work / "more").mkdir()
    for name, tint in (("cat.jpg", "cat"), ("more/a.jpg", "dog"), ("more/b.jpg", "cat")):
        pixels = np.clip(rng.normal(tints[tint], 40, size=(48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(work / name, quality=95)
    venv = Path(sys.prefix)  # the environment running the tests (scripts/test.sh: this checkout's .venv)
    assert (venv / "bin" / "activate").exists(), f"tests must run in a virtual environment, not {venv}"
    (work / ".venv").symlink_to(venv)


@pytest.mark.integration
def test_quick_start_runs_as_written(tmp_path):
    blocks = quick_start()
    work = tmp_path / "work"
    work.mkdir()
    write_files(work)
    (tmp_path / "srv").mkdir()
    in_checkout_venv = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
    server = ServerProcess(
        tmp_path / "srv",
        # serve.sh would build a .venv of its own for another environment: minutes, so not here.
        command=["bash", str(ROOT / blocks[0][1].split()[1])] if in_checkout_venv else None,
        backbone=BACKBONE_SPEC,
        open_mode="false",  # the embedded default
        tenants_file=tmp_path / "srv" / "tenants.toml",  # not there yet: the first-start path
    ).wait_ready(timeout=180)  # serve.sh sets up .venv when it is new or stale
    try:
        printed = re.search(r"^\s+(vpt_[A-Za-z0-9_-]{40,})\s*$", server.log(), re.M)
        assert printed, f"the server printed no admin key on first start:\n{server.log()}"
        script = ["set -eo pipefail"]
        for i, (lang, code) in enumerate(blocks[1:], start=1):
            code = code.replace("vpt_...", printed.group(1)).replace(DEFAULT_URL, server.url)
            script.append(f"echo '{MARK.format(i)}'")
            script.append(code if lang == "bash" else f"python - <<'PY'\n{code}PY")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "VPT_URL": server.url,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
        }
        proc = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    finally:
        assert server.stop() == 0, server.log()

    out = dict(
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"=== README block (\d+) ===\n(.*?)(?==== README block|\Z)", proc.stdout, re.S)
    )
    by_command = {code.split()[0] + " " + code.split()[1]: out[i] for i, (_, code) in enumerate(blocks) if i}
    assert len(out) == len(blocks) - 1, proc.stdout

    info = next(v for k, v in by_command.items() if "activate" in k)
    assert f"backbone     {BACKBONE_SPEC}" in info
    train = next(v for k, v in by_command.items() if k.startswith("vpt train"))
    assert "wrote pets.safetensors" in train
    uploaded = json.loads(train[train.index("\n{") : train.index("\n}\n") + 2])  # the task info
    assert (uploaded["tenant"], uploaded["task_id"], uploaded["version"]) == ("admin", "pets", 1)
    assert re.search(r"^pets\s+v1\s+deep\s", train, re.M)

    classify = next(v for k, v in by_command.items() if k.startswith("vpt classify"))
    header, *lines = classify.splitlines()
    assert header.split() == ["FILE", "LABEL", "SCORE"]
    firsts = [line.split() for line in lines if not line.startswith(" ")]  # FILE LABEL SCORE [BAR]
    assert [r[0] for r in firsts] == ["cat.jpg", "more/a.jpg", "more/b.jpg"]
    labels = [r[1] for r in firsts] + [line.split()[0] for line in lines if line.startswith(" ")]
    assert len(labels) == 6 and set(labels) == {"cat", "dog"}  # two classes: the top 3 is both
    best_for_cat = firsts[0][1]

    sdk = next(v for k, v in by_command.items() if k.startswith("from clients"))
    sdk_rows = [line.split() for line in sdk.strip().splitlines()]
    assert sdk_rows[0][0] == best_for_cat  # the CLI and the SDK agree
    assert [r[0] for r in sdk_rows] in (["cat", "dog"], ["dog", "cat"])

    curl = next(v for k, v in by_command.items() if k.startswith("curl"))
    reply = json.loads(curl)
    assert reply["task_id"] == "pets" and reply["predictions"][0][0]["label"] == best_for_cat
