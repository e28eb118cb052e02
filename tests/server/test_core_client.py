"""An API server's `CoreClient` against a real engine core served on a Unix socket, both in this
process's event loop (the same `LocalCore` and `CoreServer` the engine-core process runs): admission
with and without a round trip, the core's own check of the bounds, cancellation, results equal to the
in-process core's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import torch

from prompt_store.url import open_store
from server.core.client import CoreAddress, CoreClient
from server.core.local import LocalCore
from server.core.serve import CoreServer
from server.errors import InvalidImage, Overloaded
from server.gpu_decode import GpuDecoder
from server.metrics import Metrics
from server.preprocess import Pixels, Preprocessor
from server.settings import Settings
from tests.server import corpus
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes
from tests.server.test_gpu_decode import StandIn, jpeg
from vpt.hub import load_backbone
from vpt.transforms import ImageLimits


@contextlib.asynccontextmanager
async def served_core(
    tmp: Path, **settings: object
) -> AsyncIterator[tuple[LocalCore, Callable[[], Awaitable[CoreClient]], CoreServer]]:
    backbone = load_backbone(BACKBONE_SPEC)
    store = open_store(str(tmp / "store"))
    store.put("acme", "t", artifact_bytes(backbone, P=2, mode="deep", C=3, seed=0))
    s = Settings(backbone=BACKBONE_SPEC, store=str(tmp / "store"), engine_process=False, **settings)
    core = await LocalCore.start(s, store, Metrics())
    server = CoreServer(core, str(tmp / "core.sock"))
    await server.start()
    clients: list[CoreClient] = []

    async def connect() -> CoreClient:
        """Another API server's client."""
        arena = str(tmp / f"arena-{len(clients)}")
        clients.append(await CoreClient.connect(CoreAddress(str(tmp / "core.sock"), arena, 8 << 20, "")))
        return clients[-1]

    try:
        yield core, connect, server
    finally:
        for client in clients:
            await client.stop(0)
        await server.close()
        await core.stop(timeout_s=5)
        store.close()


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


async def classify(core, admission, pixels: torch.Tensor | Pixels):
    if isinstance(pixels, torch.Tensor):
        pixels = Pixels(pixels)
    return await core.run(admission, "t", pixels, ("classify",), top_k=3, timeout_s=10, weight=1.0)


def test_results_equal_the_in_process_core_and_admission_skips_the_round_trip_far_from_the_bounds(tmp_path):
    async def main() -> None:
        async with served_core(tmp_path) as (core, connect, _):
            client = await connect()
            pixels = images(2)
            local = await classify(core, await core.admit("acme", 2, None), pixels)
            first = await client.admit("acme", 2, 64)
            assert first.reserved  # nothing seen of the queues yet: the core holds the room
            remote = await classify(client, first, pixels)
            assert remote[0].predictions == local[0].predictions and remote[0].version == local[0].version
            second = await client.admit("acme", 2, 64)
            assert not second.reserved  # the answer said the queues are empty
            await classify(client, second, pixels)
            near = await client.admit("acme", 40, 64)
            assert near.reserved  # over half of the tenant's bound: asked
            near.release()
            assert client._outstanding_total == 0 and not client._admitted

    asyncio.run(main())


def test_the_core_checks_the_bounds_of_requests_admitted_without_asking(tmp_path):
    # A 2 s batching delay keeps the first request queued while the second arrives.
    async def main() -> None:
        async with served_core(tmp_path, max_batch_delay_ms=2000) as (core, connect, _):
            first, second = await connect(), await connect()
            for client in (first, second):  # each sees the queues empty
                await classify(client, await client.admit("acme", 1, 8), images(1))
            holder = asyncio.ensure_future(classify(first, await first.admit("acme", 6, 8), images(6)))
            await asyncio.sleep(0.1)
            assert core.scheduler.queued_images == 6
            # The other API server's view is fresh and empty: it admits without asking...
            blind = await second.admit("acme", 4, 8)
            assert not blind.reserved
            with pytest.raises(Overloaded):
                await classify(second, blind, images(4))  # ...and the core refuses: 6 + 4 > 8
            assert len(await holder) == 1
            assert core.scheduler.queued_images == 0
            assert second._outstanding_total == 0 and first._outstanding_total == 0

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_core_queue_and_frees_its_block(tmp_path):
    async def main() -> None:
        async with served_core(tmp_path, max_batch_delay_ms=5000) as (core, connect, _):
            client = await connect()
            free = client.arena.free_bytes
            job = asyncio.ensure_future(classify(client, await client.admit("acme", 4, None), images(4)))
            await asyncio.sleep(0.1)
            assert core.scheduler.queued_images == 4 and client.arena.free_bytes < free
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            for _ in range(100):
                await asyncio.sleep(0.01)
                if core.scheduler.queued_images == 0 and client.arena.free_bytes == free:
                    break
            assert core.scheduler.queued_images == 0 and client.arena.free_bytes == free

    asyncio.run(main())


def test_a_cancel_read_together_with_its_run_is_answered_and_frees_everything(tmp_path):
    """A client that disconnects right after its images were sent: RUN and CANCEL reach a busy core in
    one read, and the task for the RUN is cancelled before it ever ran. It is answered all the same, so
    the block, the admission and the held room are all given back."""

    async def main() -> None:
        async with served_core(tmp_path) as (core, connect, server):
            client = await connect()
            (conn,) = server.connections
            free = client.arena.free_bytes
            conn.transport.pause_reading()  # the core is busy: what the client sends waits in the socket
            admission_task = asyncio.ensure_future(client.admit("acme", 4, 4))
            await asyncio.sleep(0.05)
            conn.transport.resume_reading()
            admission = await admission_task
            assert admission.reserved
            conn.transport.pause_reading()
            job = asyncio.ensure_future(classify(client, admission, images(4)))
            for _ in range(100):  # until the RUN is written
                await asyncio.sleep(0.005)
                if client._blocks:
                    break
            job.cancel()  # sends CANCEL behind the RUN
            with pytest.raises(asyncio.CancelledError):
                await job
            conn.transport.resume_reading()
            for _ in range(200):
                await asyncio.sleep(0.01)
                if not client._blocks and not client._admitted:
                    break
            assert not client._blocks and not client._admitted and client._outstanding_total == 0
            assert client.arena.free_bytes == free
            core.hold("acme", 4, 4).release()  # the tenant's whole bound is free again

    asyncio.run(main())


def test_jpegs_left_to_the_core_s_gpu_decoder_cross_the_socket(tmp_path, caplog):
    """VPT_GPU_DECODE with API servers: the API server picks the JPEGs nvJPEG may decode and Pillow
    decodes the rest; the JPEGs' bytes cross in its arena behind the decoded rows, and the core decodes
    them on its device. No CUDA here: the core's real decoder reports itself unavailable (and the
    API servers then decode everything), so 'nvJPEG' is test_gpu_decode's stand-in made of Pillow."""
    limits = ImageLimits(max_bytes=200_000, max_pixels=1_000_000)
    truncated = jpeg(100, 80, 9)
    truncated = truncated[: truncated.index(b"\xff\xda")] + b"\xff\xd9"  # a header, no scan
    blobs = [jpeg(100, 80, 1), corpus.png(2, (40, 36)), jpeg(96, 96, 3), jpeg(80, 90, 2)]

    async def main() -> None:
        async with served_core(tmp_path, gpu_decode=True) as (core, connect, _):
            assert not core.info.gpu_decode and core.gpu_decoder is None
            assert "GPU JPEG decoding is off" in caplog.text
            stand_in = StandIn(refuse=(blobs[2],))
            core.use_gpu_decoder(GpuDecoder("cpu", core.info.cfg, limits, stand_in))
            client = await connect()
            assert client.info.gpu_decode  # learnt from the core when it connected
            pre = Preprocessor(client.info.cfg, limits, threads=2, gpu_jpegs=client.info.gpu_decode)
            try:
                pixels = await pre(blobs)
                assert [i for i, _ in pixels.jpegs] == [0, 2, 3] and pixels.images.shape[0] == 1
                remote = await classify(client, await client.admit("acme", 4, None), pixels)
                # One batched call, refused (image 2), then one call per image: the bytes arrived whole.
                assert stand_in.calls == [3, 1, 1, 1]
                # The same images decoded the same way, run by the core in this process: same results.
                on_device = GpuDecoder("cpu", core.info.cfg, limits, StandIn(refuse=(blobs[2],)))
                local = await classify(
                    core, await core.admit("acme", 4, None), on_device.complete(pixels.images, pixels.jpegs)
                )
                assert remote[0].predictions == local[0].predictions
                # Pillow in the core cannot decode what nvJPEG refused either: the Pillow path's 400.
                bad = await pre([jpeg(100, 80, 1), truncated])
                assert [i for i, _ in bad.jpegs] == [0, 1]
                with pytest.raises(InvalidImage, match="image 1: cannot decode image"):
                    await classify(client, await client.admit("acme", 2, None), bad)
                assert core.scheduler.queued_images == 0 and client._outstanding_total == 0
            finally:
                pre.close()

    asyncio.run(main())
