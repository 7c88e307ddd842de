"""How fast the Ray head declares a lost node dead: the one place these settings are written.

A node that disappears (a reclaimed spot VM, a deleted pod) is declared dead by the head's GCS
only after ``health_check_failure_threshold`` health checks ``health_check_period_ms`` apart have
failed. Until then, batches sent to the lost decode or model actor fail as "actor temporarily
unavailable" and use up their retries (``pipeline.flow.runtime.ACTOR_MAX_TASK_RETRIES``) at once,
and the run stops with ``ActorUnavailableError`` instead of carrying on (docs/scale.md). With
the checks below the node is declared dead in ~1.5 s and its actors restart elsewhere.

Where they are set, all from :data:`NODE_HEALTH_CHECKS`:

* the local cluster a job starts (:func:`pipeline.flow.runtime.ensure_ray`, ``_system_config``);
* the heads in ``infra/`` as ``RAY_<name>`` environment variables (:func:`head_env`): the KubeRay
  RayCluster, the embed RayJob and the nightly refresh RayJob, and ``ray start --head`` in the
  cluster launcher config (``tests/infra/test_health_checks.py`` fails when one drifts);
* the node-loss test's multi-node cluster (``tests/runs/test_multinode.py``).

A cluster whose head is started elsewhere keeps Ray's defaults (a run may then stop on node loss;
rerun the same command: it resumes from the committed chunks).
"""

from __future__ import annotations

__all__ = ["NODE_HEALTH_CHECKS", "head_env"]

#: Ray system config of the head: a dead node is declared after 3 failed checks 500 ms apart
#: (~1.5 s), checks start as soon as a node joins. These are the values the node-loss test runs with.
NODE_HEALTH_CHECKS: dict[str, int] = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}


def head_env() -> dict[str, str]:
    """:data:`NODE_HEALTH_CHECKS` as the environment variables Ray reads on the head
    (``RAY_<name>``), for a container's ``env`` or a ``ray start --head`` command line."""
    return {f"RAY_{k}": str(v) for k, v in NODE_HEALTH_CHECKS.items()}
