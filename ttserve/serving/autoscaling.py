"""How many Generator replicas the work needs: Serve's custom autoscaling policy for the Generator.

Serve's default policy counts ongoing requests, but a Generator's requests are not alike: one that trains
holds the replica's single training thread for seconds to minutes, while generations share the engine's
batch. So each replica reports what limits it (`record_autoscaling_stats` in app.py):

- `training_backlog_s`: admitted training not yet done, in seconds at the replica's measured step speed;
- `generations`: requests generating now (the engine's batch) or waiting for a slot in it (admission.py).

and the policy asks for enough replicas that neither exceeds its per-replica target. Serve applies
min/max_replicas, the up/down delays and the scaling factors around it (configs/serve*.yaml).
Plain Python over Serve's `AutoscalingContext`: it runs in the Serve controller, so it imports no ML library.
"""

from __future__ import annotations

from typing import Any

TRAINING_BACKLOG_S = "training_backlog_s"
GENERATIONS = "generations"


class GeneratorLoad:
    """`policy_function` of the Generator's autoscaling_config; its targets are the `policy_kwargs`."""

    def __init__(self, training_backlog_s: float = 30.0, generations: float = 16.0):
        if training_backlog_s <= 0 or generations <= 0:
            raise ValueError("the per-replica targets must be positive")
        self.training_backlog_s = training_backlog_s
        self.generations = generations

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        return self.replicas_for(ctx.aggregated_metrics or {}, ctx.total_queued_requests or 0), {}

    def replicas_for(self, metrics: dict[str, dict[Any, float]], queued_at_callers: float) -> float:
        """Replicas wanted for the replicas' reported metrics (metric name -> replica -> value) and the
        requests waiting at the callers for a replica (each will generate)."""
        backlog = sum(metrics.get(TRAINING_BACKLOG_S, {}).values())
        generating = sum(metrics.get(GENERATIONS, {}).values()) + queued_at_callers
        return max(backlog / self.training_backlog_s, generating / self.generations)
