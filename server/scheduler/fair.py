"""Per-tenant queues with weighted fair selection (start-time fair queuing over images).

Each tenant has a FIFO queue and a virtual time: the images it has been served divided by its weight
(the start tag of its next request). The next request always comes from the backlogged tenant with the
smallest virtual time, so under contention tenants get engine images in proportion to their weights,
whatever their offered load. A tenant that becomes backlogged starts at the system virtual time, the
start tag of the request served last (no credit is banked while idle) — SFQ (Goyal et al., 1996). So a
light tenant's new request ranks at or before the heavy tenant's next one, whose start tag is past it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from server.scheduler.types import Request


class FairQueues:
    def __init__(self) -> None:
        self._queues: dict[str, deque[Request]] = {}
        self._vtime: dict[str, float] = {}
        self._weight: dict[str, float] = {}
        self._images: dict[str, int] = {}  # queued images per tenant
        self.total_images = 0
        self.clock = 0.0  # system virtual time: the start tag of the request taken last

    def __bool__(self) -> bool:
        return self.total_images > 0

    def queued_images(self, tenant: str) -> int:
        return self._images.get(tenant, 0)

    def push(self, req: Request, weight: float = 1.0) -> None:
        t = req.tenant
        q = self._queues.get(t)
        if not q:
            self._vtime[t] = max(self._vtime.get(t, 0.0), self.clock)
            q = self._queues[t] = deque()
        self._weight[t] = weight
        q.append(req)
        self._count(req, +1)

    def push_front(self, req: Request) -> None:
        """Return a request taken by a plan that was abandoned (keeps its place and charge)."""
        self._queues.setdefault(req.tenant, deque()).appendleft(req)
        self._count(req, +1)
        self._vtime[req.tenant] -= req.n / self._weight.get(req.tenant, 1.0)

    def remove(self, req: Request) -> bool:
        q = self._queues.get(req.tenant)
        if q is None or req not in q:
            return False
        q.remove(req)
        self._count(req, -1)
        return True

    def take(self, req: Request) -> None:
        """`req` goes into a batch: dequeue it and charge its tenant."""
        self.remove(req)
        self.clock = self._vtime[req.tenant]
        self._vtime[req.tenant] += req.n / self._weight.get(req.tenant, 1.0)

    def start_tag(self, tenant: str) -> float:
        """The virtual time at which the tenant's next request starts (lower runs first)."""
        return self._vtime[tenant]

    def tenants_by_priority(self) -> list[str]:
        """Backlogged tenants, the least served (by weight) first."""
        return sorted((t for t, q in self._queues.items() if q), key=lambda t: self._vtime[t])

    def queue(self, tenant: str) -> deque[Request] | tuple[()]:
        """The tenant's live queue, oldest first (do not modify while iterating)."""
        return self._queues.get(tenant) or ()

    def requests(self, tenant: str) -> Iterator[Request]:
        """A snapshot of the tenant's queue, oldest first (safe to remove while iterating)."""
        return iter(list(self._queues.get(tenant, ())))

    def all_requests(self) -> Iterator[Request]:
        for q in self._queues.values():
            yield from list(q)

    def _count(self, req: Request, sign: int) -> None:
        self._images[req.tenant] = self._images.get(req.tenant, 0) + sign * req.n
        self.total_images += sign * req.n
