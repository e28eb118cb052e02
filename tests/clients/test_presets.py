"""`vpt presets` and docs/backbones.md list the `random:` presets of `vpt.config.PRESETS`, no other.

The preset names used to appear only in the error for an unknown one; the command prints the code's
table, and the document's copy is checked against it here, so neither drifts from the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clients.cli import EXIT_OK, main
from vpt.config import PRESETS

DOC = Path(__file__).resolve().parents[2] / "docs" / "backbones.md"


def shape(name: str) -> list[str]:
    """What each row shows of a preset: spec, D, layers, heads, patch, image side."""
    c = PRESETS[name]
    return [f"random:{name}", *map(str, (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size))]


def test_vpt_presets_prints_the_codes_table(capsys):
    assert main(["presets"]) == EXIT_OK
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["SPEC", "D", "LAYERS", "HEADS", "PATCH", "IMAGE"]
    assert [row.split() for row in rows] == [shape(name) for name in PRESETS]

    assert main(["presets", "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc == {f"random:{name}": cfg.to_dict() for name, cfg in PRESETS.items()}


def test_backbones_doc_lists_the_codes_presets():
    text = DOC.read_text()
    assert "\n### `random:` presets\n" in text, "docs/backbones.md has no '### `random:` presets' section"
    section = text.split("\n### `random:` presets\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.+) \|$", section, re.M)
    assert rows, "docs/backbones.md has no preset table under '### `random:` presets'"
    listed = [[f"random:{name}", *(cell.strip() for cell in rest.split("|"))] for name, rest in rows]
    assert listed == [shape(name) for name in PRESETS]
