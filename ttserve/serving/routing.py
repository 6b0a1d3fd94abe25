"""Which Generator replica answers a request: the one that holds its adapter, else the one that owns it.

A request that needs an adapter carries the adapter's content key as its Serve `multiplexed_model_id`
(the Planner computed it before a replica was chosen, ttserve/planning.py). The router ranks:

1. replicas that report holding or training that adapter (each Generator reports its ids as routing
   stats, `record_routing_stats`, every `request_routing_stats_period_s`);
2. then every replica in rendezvous-hash order for the key (highest random weight): all routers, in
   every ingress replica, rank the same replica first for the same key without talking to each other,
   so concurrent identical requests reach one replica and its adapter cache trains once; a replica
   joining or leaving moves only the keys it wins or loses.

Serve tries the ranks in order and within a rank takes the replica with the shortest queue that accepts,
so a saturated owner spills to the next replica in hash order (the same one for every router) rather
than stalling. Requests without an adapter (base model, reuse impossible) use the power of two choices.
Why this and not Serve's stock multiplexed routing: docs/scaling.md ("Adapter affinity").

The module imports Ray Serve but no ML library: it runs in the ingress, inside the Generator handle.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# The routing-stats key under which a Generator replica reports the adapter ids it holds or is training.
ADAPTERS = "adapters"
Replica = TypeVar("Replica")


def rendezvous_weight(adapter_id: str, replica: str) -> bytes:
    """The replica's weight for the key: a hash of both, compared as bytes."""
    return hashlib.blake2b(f"{adapter_id}\0{replica}".encode(), digest_size=8).digest()


def rank_for_adapter(
    adapter_id: str,
    replicas: Sequence[Replica],
    name: Callable[[Replica], str],
    holds: Callable[[Replica], Collection[str]],
) -> list[list[Replica]]:
    """Ranks for a request needing `adapter_id`: its holders together, then one replica per rank in
    rendezvous order (the owner first)."""
    holders = [r for r in replicas if adapter_id in holds(r)]
    others = sorted(
        (r for r in replicas if adapter_id not in holds(r)),
        key=lambda r: rendezvous_weight(adapter_id, name(r)),
        reverse=True,
    )
    return ([holders] if holders else []) + [[r] for r in others]


def held_adapters(replica: RunningReplica) -> Collection[str]:
    return (replica.routing_stats or {}).get(ADAPTERS, ())


class AdapterAffinityRouter(RequestRouter):
    """Serve's request-router extension point, configured on the Generator deployment (sizing.py)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not adapter_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return rank_for_adapter(
            adapter_id, candidate_replicas, lambda r: r.replica_id.unique_id, held_adapters
        )
