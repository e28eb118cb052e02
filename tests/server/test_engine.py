"""Engine and prompt bank on CPU: residency rules and the batch-invariance of mixed batches."""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine.bank import BankFull, TaskKey, TaskTooLarge
from server.engine.batch import EngineBatch, split_modes
from server.engine.engine import Engine, pick_device, pick_dtype
from server.engine.process import ProcessConfig
from tests.server.helpers import BACKBONE_SPEC, make_artifact
from vpt.hub import load_backbone
from vpt.prompts import PromptBatch

TOL = 1e-5


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BACKBONE_SPEC)


def make_engine(backbone, slots: int = 8, **kw) -> Engine:
    return Engine(
        backbone, bank_slots=slots, max_prompt_length=kw.pop("P", 12), max_classes=kw.pop("C", 10), **kw
    )


def run(engine: Engine, images: torch.Tensor, slots: list[int], output="classify", top_k=10):
    infos = [engine.bank.info(s) for s in slots]
    return engine.run(EngineBatch(images, slots, infos, output, top_k))


TASKS = [  # (P, mode, C)
    (4, "deep", 3),
    (0, "shallow", 5),
    (9, "shallow", 10),
    (12, "deep", 7),
    (4, "shallow", 2),
]


def test_mixed_batch_equals_solo_runs(backbone):
    engine = make_engine(backbone)
    slots = [
        engine.install(TaskKey("t", f"task{i}", 1), make_artifact(backbone, P=P, mode=m, C=C, seed=i))
        for i, (P, m, C) in enumerate(TASKS)
    ]
    order = [0, 1, 2, 3, 4, 3, 2, 1, 0, 4, 2]
    images = torch.randint(0, 256, (len(order), 3, 32, 32), dtype=torch.uint8)
    batch_slots = [slots[i] for i in order]
    mixed = run(engine, images, batch_slots, "embed")
    mixed_cls = run(engine, images, batch_slots, "classify")
    worst = 0.0
    for b, s in enumerate(batch_slots):
        solo = run(engine, images[b : b + 1], [s], "embed")
        err = (mixed.features[b] - solo.features[0]).abs().max() / solo.features[0].abs().max()
        worst = max(worst, err.item())
        solo_cls = run(engine, images[b : b + 1], [s], "classify")
        C = TASKS[order[b]][2]
        assert mixed_cls.indices[b, :C].tolist() == solo_cls.indices[0, :C].tolist()
        assert torch.allclose(mixed_cls.scores[b, :C], solo_cls.scores[0, :C], atol=1e-6)
        assert torch.all(mixed_cls.scores[b, C:] == 0)  # padded classes never score
    assert worst <= TOL


def reference(backbone, image: torch.Tensor, art) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS feature, class probabilities) of one uint8 image through the token path with the task's
    prompts (`PromptBatch.single_task`: the official VPT forward's algorithm, tests/vpt/test_official.py)."""
    model = backbone.model
    with torch.inference_mode():
        x = model.normalize(image[None])
        feats = model.pool(
            model.forward_features(x, PromptBatch.single_task(art.prompts, 1, art.mode == "deep"))
        )
        probs = (feats @ art.head_weight.T + art.head_bias).softmax(dim=-1)
    return feats[0], probs[0]


EXACT = [  # (P, mode, C): deep with and without padding to the batch's longest, shallow, prompt-free
    (12, "deep", 7),
    (12, "deep", 4),
    (5, "deep", 3),
    (1, "deep", 10),
    (0, "deep", 2),
    (9, "shallow", 10),
    (3, "shallow", 5),
    (0, "shallow", 6),
]
EXACT_BATCHES = [
    [0, 1, 0, 1],  # deep, uniform lengths: keys/values without a mask
    [0, 2, 3, 4, 2],  # deep, ragged: masked
    [5, 6, 7, 5],  # shallow only: prompts as tokens
    [0, 5, 2, 6, 4, 7, 3, 1],  # mixed: two sub-batches
    [3],
    [6],
    [0, 5, 2, 6, 4, 7, 3, 5, 1, 6, 0, 7, 2, 5, 3, 6],  # mixed, large: two sub-batches (split_modes)
]


def modes(order: list[int]) -> tuple[list[bool], list[int]]:
    return [EXACT[i][1] == "deep" for i in order], [EXACT[i][0] for i in order]


@pytest.mark.parametrize("process", [False, True], ids=["in_process", "engine_process"])
def test_served_results_equal_the_reference_forward(backbone, process):
    """Issue J: deep tasks served as per-layer keys/values, shallow ones as tokens, in any mix — every
    sample's features and probabilities equal the token-path forward run on it alone, within 1e-5
    relative (fp32), in the server's process and in the engine process."""
    # Both ways of running a mixed batch are covered: one forward, and two sub-batches (the last).
    cpu = torch.device("cpu")
    assert not split_modes(*modes(EXACT_BATCHES[3]), cpu) and split_modes(*modes(EXACT_BATCHES[-1]), cpu)
    kw = {"process": ProcessConfig(max_batch_size=16)} if process else {}
    engine = make_engine(load_backbone(BACKBONE_SPEC) if process else backbone, **kw)
    try:
        engine.warmup((1,))
        arts = [make_artifact(backbone, P=P, mode=m, C=C, seed=20 + i) for i, (P, m, C) in enumerate(EXACT)]
        slots = [engine.install(TaskKey("t", f"x{i}", 1), a) for i, a in enumerate(arts)]
        gen = torch.Generator().manual_seed(5)
        for order in EXACT_BATCHES:
            images = torch.randint(0, 256, (len(order), 3, 32, 32), dtype=torch.uint8, generator=gen)
            s = [slots[i] for i in order]
            feats = run(engine, images, s, "embed").features
            cls = run(engine, images, s, "classify")
            for b, i in enumerate(order):
                want_f, want_p = reference(backbone, images[b], arts[i])
                err = ((feats[b] - want_f).norm() / want_f.norm()).item()
                assert err <= TOL, (order, b, err)
                C = EXACT[i][2]
                got_p = torch.zeros(C).scatter_(0, cls.indices[b, :C], cls.scores[b, :C])
                assert ((got_p - want_p).abs().max() / want_p.max()).item() <= TOL, (order, b)
    finally:
        engine.close()


def test_bank_holds_tokens_for_shallow_and_keys_values_for_deep(backbone):
    """What a slot costs (issue J): shallow P x D, deep L x 2 x P x D (keys and values), plus the head;
    the byte budget plans for both."""
    cfg = backbone.cfg
    engine = make_engine(backbone, P=12, C=10)
    L, D, elem = cfg.depth, cfg.embed_dim, 4
    assert engine.bank.slot_bytes == ((1 + 2 * L) * 12 * D + 10 * D + 10) * elem
    deep = engine.install(TaskKey("t", "d", 1), make_artifact(backbone, P=5, mode="deep", C=3, seed=0))
    shallow = engine.install(TaskKey("t", "s", 1), make_artifact(backbone, P=5, mode="shallow", C=3, seed=0))
    assert engine.bank.info(deep).nbytes == (2 * L * 5 * D + 3 * D + 3) * elem
    assert engine.bank.info(shallow).nbytes == (5 * D + 3 * D + 3) * elem
    assert engine.bank.stats().used_bytes == engine.bank.info(deep).nbytes + engine.bank.info(shallow).nbytes


def test_bank_lru_eviction_pinning_and_refs(backbone):
    engine = make_engine(backbone, slots=2)
    bank = engine.bank
    a = make_artifact(backbone, P=2, mode="shallow", C=2, seed=0)
    k1, k2, k3 = (TaskKey("t", n, 1) for n in ("a", "b", "c"))
    s1 = engine.install(k1, a)
    engine.install(k2, a)
    assert bank.lookup(k1) == s1  # k1 now most recently used
    engine.install(k3, a)  # evicts k2 (LRU)
    assert bank.lookup(k2) is None and bank.lookup(k1) is not None
    assert bank.stats().evictions == 1
    # A slot bound to in-flight requests cannot be evicted, nor a pinned one.
    bank.acquire(bank.lookup(k1))
    bank.pin("t", "c")
    with pytest.raises(BankFull):
        engine.install(k2, a)
    bank.release(bank.lookup(k1))
    engine.install(k2, a)  # k1 free again → evicted
    assert bank.lookup(k1) is None and bank.lookup(k3) is not None


def test_new_version_replaces_old_after_drain(backbone):
    engine = make_engine(backbone, slots=3)
    bank = engine.bank
    old = bank.lookup(TaskKey("t", "x", 1)) or engine.install(
        TaskKey("t", "x", 1), make_artifact(backbone, P=2, mode="deep", C=3, seed=1)
    )
    bank.acquire(old)  # a request is bound to v1
    engine.install(TaskKey("t", "x", 2), make_artifact(backbone, P=3, mode="deep", C=3, seed=2))
    assert bank.lookup(TaskKey("t", "x", 1)) is None  # no new request gets v1
    assert bank.info(old).key.version == 1  # ...but the bound one still reads it intact
    assert bank.stats().resident == 1
    bank.release(old)
    assert bank.resident_versions("t", "x") == [2]


def test_byte_budget_caps_slots_and_limits_are_enforced(backbone):
    engine = make_engine(backbone, slots=100, bank_bytes=10 * 1024 * 1024)
    assert engine.bank.capacity == min(100, 10 * 1024 * 1024 // engine.bank.slot_bytes)
    with pytest.raises(ValueError, match="smaller than one slot"):
        make_engine(backbone, bank_bytes=16)
    with pytest.raises(TaskTooLarge, match="prompt length"):
        engine.install(TaskKey("t", "big", 1), make_artifact(backbone, P=13, mode="shallow", C=2, seed=0))
    with pytest.raises(TaskTooLarge, match="classes"):
        engine.install(TaskKey("t", "big", 1), make_artifact(backbone, P=1, mode="shallow", C=11, seed=0))


def test_engine_normalises_on_device_like_the_model(backbone):
    engine = make_engine(backbone)
    slot = engine.install(TaskKey("t", "n", 1), make_artifact(backbone, P=0, mode="shallow", C=2, seed=3))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    feats = run(engine, images, [slot, slot], "embed").features
    cfg = backbone.cfg
    x = (images.float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ref = backbone.model(x)
    assert torch.allclose(feats, ref, atol=1e-5)


def test_slot_reuse_leaves_exactly_the_new_task_and_zeros(backbone):
    """A slot reused by tasks of other geometries (deep/shallow, longer/shorter prompts, more/fewer
    classes) holds the new task's values and zeros everywhere else: the old task's padding is cleared
    even though only the part the new task does not overwrite is zeroed."""
    engine = make_engine(backbone, slots=1)
    bank = engine.bank
    for i, (P, mode, C) in enumerate([(12, "deep", 10), (4, "shallow", 3), (9, "deep", 7), (0, "shallow", 2),
                                      (12, "deep", 10), (12, "deep", 10), (1, "deep", 9)]):  # fmt: skip
        art = make_artifact(backbone, P=P, mode=mode, C=C, seed=10 + i)
        slot = engine.install(TaskKey("t", f"geo{i}", 1), art)
        assert slot == 0
        # A shallow task's slot holds its prompt tokens, a deep one's their keys/values.
        tokens, kv = torch.zeros_like(bank.prompts[0]), torch.zeros_like(bank.prompt_kv[0])
        if mode == "shallow":
            tokens[:, :P] = art.prompts
        elif P:
            with torch.no_grad():
                kv[:, :P] = backbone.model.prompt_kv(art.prompts)
        assert torch.equal(bank.prompts[0], tokens) and torch.equal(bank.prompt_kv[0], kv), i
        w, b = torch.zeros_like(bank.head_weight[0]), torch.zeros_like(bank.head_bias[0])
        w[:C], b[:C] = art.head_weight, art.head_bias
        assert torch.equal(bank.head_weight[0], w) and torch.equal(bank.head_bias[0], b), i


def test_device_choice(monkeypatch):
    """auto = CUDA when present (issue C), else the CPU; an explicit device is taken as given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("cpu") == torch.device("cpu")


def test_dtype_choice():
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16  # the GPU default (issue H)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        pick_dtype("int8", torch.device("cpu"))


@pytest.mark.slow
def test_compiled_engine_equals_eager(backbone):
    """VPT_COMPILE: torch.compile(dynamic=True) of the backbone gives the eager engine's results for a
    mixed batch (deep and shallow, several prompt lengths: the masked path). Inductor on CPU here."""
    eager, compiled = make_engine(backbone), make_engine(backbone, compile=True)
    installed = [
        [
            e.install(TaskKey("t", f"task{i}", 1), make_artifact(backbone, P=P, mode=m, C=C, seed=i))
            for i, (P, m, C) in enumerate(TASKS)
        ]
        for e in (eager, compiled)
    ]
    assert installed[0] == installed[1]  # same slots in both banks: one batch serves both
    order = [0, 3, 1, 4, 2]
    images = torch.randint(
        0, 256, (len(order), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    s = [installed[0][i] for i in order]
    ref, got = run(eager, images, s, "embed"), run(compiled, images, s, "embed")
    err = (got.features - ref.features).abs().max() / ref.features.abs().max()
    assert err < 1e-4, err.item()


def test_a_batch_preempting_one_not_started_yet_still_runs_between_its_blocks(backbone):
    """In-process executor: `preempt` right after `submit(preemptible=True)`, while the engine thread is
    still busy with something else, runs at the preemptible batch's first block boundary — it is not
    queued behind the whole batch."""
    engine = make_engine(backbone)
    slot = engine.install(TaskKey("t", "p", 1), make_artifact(backbone, P=3, mode="deep", C=4, seed=1))
    info = engine.bank.info(slot)
    gate = threading.Event()
    busy = engine.executor.call(gate.wait)  # the engine thread is taken until the gate opens
    heavy = engine.submit(EngineBatch(torch.zeros(16, 3, 32, 32, dtype=torch.uint8), [slot] * 16, [info] * 16,
                                      "classify", 3), preemptible=True)  # fmt: skip
    light = engine.preempt(
        EngineBatch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [slot], [info], "classify", 3)
    )
    done: list[str] = []
    heavy.add_done_callback(lambda _: done.append("heavy"))
    light.add_done_callback(lambda _: done.append("light"))
    gate.set()
    busy.result(timeout=10)
    heavy.result(timeout=30)
    light.result(timeout=30)
    assert done == ["light", "heavy"]
    engine.close()
