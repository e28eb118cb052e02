"""The pieces between the API servers and the engine core, without processes: the frames and their
encodings, the image arena's allocator, the shared rate-limit table."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.core import protocol as p
from server.core.arena import ALIGN, Arena
from server.core.process import arena_bytes, jpeg_budget
from server.errors import InvalidArtifact, Overloaded, TaskNotFound
from server.ratelimit import RateLimiter, SharedRateLimiter
from server.scheduler.types import Prediction, Result
from server.settings import Settings


@pytest.mark.parametrize("outputs", [("classify",), ("embed",), ("classify", "embed"), ("embed", "classify")])
@pytest.mark.parametrize(("reserved", "bound"), [(True, None), (False, 64)])
def test_run_round_trips(outputs, reserved, bound):
    run = p.Run(4096, 3, 224, 200, 5, 30.0, 0.5, outputs, "acmé", "birds-v2", reserved, bound)
    assert p.Run.decode(memoryview(run.encode())) == run


def test_run_with_jpegs_left_to_the_core_round_trips():
    jpegs = ((0, 51_234), (2, 7), (63, 20 << 20))
    run = p.Run(64, 1, 224, 224, 1, 5.0, 1.0, ("classify",), "t", "birds", False, None, jpegs)
    back = p.Run.decode(memoryview(run.encode()))
    assert back == run and back.images == 4 and back.nbytes == 3 * 224 * 224 + 51_234 + 7 + (20 << 20)


def test_queue_state_heads_an_answer():
    state, rest = p.decode_state(memoryview(p.encode_state(7, 4096) + b"rest"))
    assert (state, bytes(rest)) == ((7, 4096), b"rest")


def test_results_round_trip():
    classify = Result(7, [[Prediction("a", 1, 0.75), Prediction("bé", 0, 0.25)]] * 2, None, 0.001, 0.002, 9)
    embed = Result(7, None, [[0.5, -1.0, 2.0]] * 2, 0.003, 0.004, 9)
    out = p.decode_results(memoryview(p.encode_results([classify, embed])))
    assert out[0].predictions == classify.predictions and out[0].version == 7 and out[0].batch_size == 9
    assert out[1].features == embed.features
    assert out[0].queue_s == pytest.approx(0.001) and out[1].compute_s == pytest.approx(0.004)


def test_labels_of_any_length_and_code_points_cross():
    # An artifact's labels are the tenant's: 100 kB of them, or a lone surrogate its JSON allowed.
    labels = ["x" * 100_000, "\ud800 lone", "ok"]
    r = Result(1, [[Prediction(label, i, 0.5) for i, label in enumerate(labels)]], None, 0.0, 0.0, 1)
    (back,) = p.decode_results(memoryview(p.encode_results([r])))
    assert [q.label for q in back.predictions[0]] == labels


def test_errors_come_back_as_the_same_type_message_and_headers():
    for e in (
        Overloaded("full", retry_after=3),
        TaskNotFound("no such task"),
        InvalidArtifact("bad", field="x"),
    ):
        back = p.decode_error(memoryview(p.encode_error(e)))
        assert (type(back), back.message, back.headers) == (type(e), e.message, e.headers)
        assert getattr(back, "field", None) == getattr(e, "field", None)
    back = p.decode_error(memoryview(p.encode_error(ValueError("secret detail"))))
    assert back.status == 500 and "secret" not in back.message  # only the type name crosses


def test_frames_split_anywhere_arrive_whole_and_in_order():
    got: list[tuple[int, int, bytes]] = []
    framed = p.Framed(lambda k, r, b: got.append((k, r, bytes(b))), lambda e: None)
    stream = b"".join(p.frame(p.RUN, i, bytes([i]) * i) for i in range(1, 6))
    for i in range(0, len(stream), 3):  # 3 bytes at a time
        framed.data_received(stream[i : i + 3])
    assert got == [(p.RUN, i, bytes([i]) * i) for i in range(1, 6)]


def test_a_bad_frame_length_drops_the_connection():
    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    framed = p.Framed(lambda k, r, b: None, lambda e: None)
    framed.transport = Transport()  # type: ignore[assignment]
    framed.data_received((2**31).to_bytes(4, "little") + b"\0" * 9)
    assert framed.transport.aborted  # type: ignore[union-attr]


def test_arena_blocks_are_aligned_coalesce_and_wait_for_room(tmp_path):
    async def main() -> None:
        arena = Arena(str(tmp_path / "arena"), 4 * ALIGN, create=True)
        other = Arena(str(tmp_path / "arena"), 4 * ALIGN, create=False)  # the core's view
        a, b = await arena.take(ALIGN), await arena.take(2 * ALIGN + 1)
        assert (a, b) == (0, ALIGN) and arena.alloc(2 * ALIGN) is None
        arena.view(a, (1, 8, 8)).fill_(7)
        assert torch.equal(other.view(a, (1, 8, 8)), torch.full((1, 8, 8), 7, dtype=torch.uint8))
        waiting = asyncio.ensure_future(arena.take(2 * ALIGN))
        await asyncio.sleep(0)
        assert not waiting.done()
        arena.free(a, ALIGN)
        await asyncio.sleep(0)
        assert not waiting.done()  # one block of ALIGN free, not two
        arena.free(b, 2 * ALIGN + 1)
        assert await waiting == 0  # the three freed blocks coalesced
        with pytest.raises(ValueError):
            arena.view(3 * ALIGN, (2, ALIGN))

    asyncio.run(main())


def test_shared_rate_limit_is_one_bucket_for_every_process(tmp_path):
    # Two tables on one file, as two API servers map it: they draw from the same bucket.
    first, second = SharedRateLimiter(str(tmp_path / "rates")), SharedRateLimiter(str(tmp_path / "rates"))
    takes = [(first if i % 2 else second).acquire("acme", 0.001, 4) for i in range(8)]
    assert [t == 0 for t in takes] == [True] * 4 + [False] * 4
    assert first.acquire("other", 0.001, 1) == 0  # another tenant, another bucket
    local = RateLimiter()
    assert [local.acquire("acme", 0.001, 4) == 0 for _ in range(5)] == [True] * 4 + [False]


def test_shared_rate_limit_table_resolves_collisions(tmp_path, monkeypatch):
    monkeypatch.setattr(SharedRateLimiter, "SLOTS", 2)
    table = SharedRateLimiter(str(tmp_path / "rates"))
    assert [table.acquire(t, 0.001, 1) for t in ("a", "b")] == [0, 0]
    assert table.acquire("a", 0.001, 1) > 0 and table.acquire("b", 0.001, 1) > 0
    assert table.acquire("c", 0.001, 1) == 0  # a full table: a bucket in this process instead


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_the_jpeg_budget_keeps_two_of_the_largest_requests_in_the_arena(gpu_decode):
    """A request's block (its decoded rows and the JPEGs left to the core) never exceeds half the arena,
    so two of the largest always fit; with GPU decoding the arena makes room for JPEGs as large again
    as the pixels, and an arena set too small leaves every JPEG to Pillow."""
    s = Settings(gpu_decode=gpu_decode)
    largest = s.max_images_per_request * 3 * 224 * 224
    arena = arena_bytes(s, 224)
    budget = jpeg_budget(s, 224, arena)
    assert largest + budget <= arena // 2
    assert budget == (largest if gpu_decode else max(0, arena // 2 - largest))
    small = Settings(gpu_decode=True, api_arena_bytes=largest)
    assert jpeg_budget(small, 224, arena_bytes(small, 224)) == 0
