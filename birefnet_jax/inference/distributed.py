"""`birefnet-jax predict` on many hosts (`--distributed`).

Every process plans the whole set of inputs (so all refuse or none does) and predicts its own share
of it (`birefnet_jax.inference.plan.process_share`) on its own devices: nothing crosses processes
while predicting. `jax.distributed` serves for the process index and count, and at the end for
each process's counts, through the coordination service's key-value store (no device collective,
nothing compiled): every process `publish`es its counts, then `gather`s everyone's, so process 0
can report the total.

`gather` is also the end barrier, and it matters: a process leaving while another still works
would abort them all five minutes later (the deadline of `jax.distributed`'s shutdown, which
`jax.distributed.initialize` does not let one raise on the client side), and shares can end hours
apart (a resumed run, a long video). So every process publishes, failed or not, and waits in
`gather` for the slowest, whose work is not bounded by any deadline; all then leave together. A
process that dies still takes the others down after JAX's heartbeat timeout (100 s), as in any
`jax.distributed` program; the outputs written so far are whole files, and a rerun resumes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax

# How long a process that is done waits for the others (see the module doc).
WAIT_TIMEOUT_S = 7 * 24 * 3600
_KEY = "birefnet_jax/predict/counts/{}"
_COUNTS = ("done", "skipped", "failed", "frames")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize`: the cluster from the environment (TPU pods, SLURM, Open MPI) or
    from the arguments. Call it before anything touches a device."""
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _client():
    """The `jax.distributed` client, or None (not initialised; or a JAX without it where it was)."""
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:  # pragma: no cover - JAX moved it
        return None
    return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def counts(summary) -> dict[str, int]:
    """The counts of a `PredictSummary` that `publish` shares."""
    return {"done": summary.done, "skipped": summary.skipped, "failed": len(summary.failed),
            "frames": summary.frames}


def publish(summary) -> bool:
    """Share this process's counts (`summary`: a `PredictSummary`, or None when the process failed
    before it had one) for process 0's total; False where `jax.distributed` is not initialised or the
    store refused. Call it exactly once per process, failed or not, so that process 0 never waits for
    a process that has given up."""
    client = _client()
    if client is None:
        return False
    try:
        client.key_value_set(_KEY.format(jax.process_index()), json.dumps(None if summary is None else counts(summary)))
    except Exception:  # the total is a convenience: never fail a process's work for it
        return False
    return True


def gather(timeout_s: float = WAIT_TIMEOUT_S) -> list[dict[str, int] | None] | None:
    """Every process's published counts, in process order, once all have published: the end
    barrier (see the module doc). None for a process that failed before counting; None for the
    whole where they cannot be had (`jax.distributed` not initialised, the store failing)."""
    client = _client()
    if client is None:
        return None
    try:
        return [json.loads(client.blocking_key_value_get(_KEY.format(i), int(timeout_s * 1000)))
                for i in range(jax.process_count())]
    except Exception:
        return None


def total_report(outcomes: Sequence[dict[str, int] | None] | None) -> tuple[str, bool]:
    """(the line that sums the processes' counts, whether every process predicted or skipped every
    input of its share)."""
    if outcomes is None:
        return "[total] not available: the processes' counts could not be gathered", False
    got = [o for o in outcomes if o is not None]
    total = {k: sum(o.get(k, 0) for o in got) for k in _COUNTS}
    line = (f"[total over {len(outcomes)} processes] done {total['done']}, skipped {total['skipped']} "
            f"(outputs exist), failed {total['failed']}")
    if total["frames"]:
        line += f"; video frames: {total['frames']}"
    missing = [str(i) for i, o in enumerate(outcomes) if o is None]
    if missing:
        line += f"; process(es) {', '.join(missing)} stopped with an error (see their output)"
    return line, not missing and not total["failed"]


def prefixed(report: str, process_index: int, process_count: int) -> str:
    """Every line of `report` prefixed with the process (`[process 1/4] `)."""
    return "\n".join(f"[process {process_index}/{process_count}] {line}" for line in report.splitlines())
