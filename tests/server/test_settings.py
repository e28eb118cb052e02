"""Settings: environment parsing, validation, and the generated docs table staying true."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import Settings, settings_markdown


def test_env_prefix_and_types(monkeypatch):
    monkeypatch.setenv("VPT_MAX_BATCH_SIZE", "17")
    monkeypatch.setenv("VPT_PINNED_TASKS", '["acme/birds"]')
    s = Settings()
    assert s.max_batch_size == 17 and s.pinned_tasks == ["acme/birds"]
    assert s.effective_pipeline_depth("cuda") == 2 and s.effective_pipeline_depth("cpu") == 1


def test_preemption_only_where_it_can_work():
    """On by default on CPU; off on CUDA, with more than one batch in flight, with a compiled backbone
    (no block boundaries) or when switched off."""
    assert Settings().effective_preempt("cpu")
    assert not Settings().effective_preempt("cuda")
    assert not Settings(pipeline_depth=2).effective_preempt("cpu")
    assert not Settings(compile=True).effective_preempt("cpu")
    assert not Settings(preempt=False).effective_preempt("cpu")


def test_engine_process_on_cpu_only():
    """On by default on CPU (the forward out of the front end's GIL); a GPU computes in process."""
    assert Settings().effective_engine_process("cpu")
    assert not Settings().effective_engine_process("cuda")
    assert not Settings(engine_process=False).effective_engine_process("cpu")


@pytest.mark.parametrize(
    ("var", "value"), [("VPT_MAX_BATCH_SIZE", "0"), ("VPT_PINNED_TASKS", '["nosep"]'), ("VPT_DTYPE", "int8")]
)
def test_invalid_settings_are_refused(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_docs_table_matches_the_code():
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    table = doc.split("<!-- settings-table:start -->\n", 1)[1].split("\n<!-- settings-table:end -->", 1)[0]
    assert table.strip() == settings_markdown().strip(), "regenerate with: python -m server.settings"
