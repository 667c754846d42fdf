"""cluster=ray_job: submit the entry to a running Ray cluster through the Ray Jobs API.

The job's runtime_env:
  working_dir  <run dir>/launch/: the resolved config (resolved/config.yaml, see
               launchers/common.py) and a snapshot of the config tree it was composed from
               (conf/), uploaded by Ray;
  py_modules   this checkout's `orchestrator` and `launchers` packages (cluster.upload_code),
               so the cluster needs only Ray and the dependencies (cluster.pip adds more);
  env_vars     cluster.env, the cluster.forward_env variables set here, and a 120 s grace
               on stop so the driver can checkpoint (RAY_JOB_STOP_WAIT_TIME_S).
The entrypoint runs the driver on the head, attached to that cluster (cluster=ray):

    ORCHESTRATOR_CONF=$PWD/conf python -m orchestrator 'hydra.searchpath=[file://$PWD]' +resolved=config

The run dir is the same absolute path there: put run.output_dir on storage the cluster
writes to (for a remote cluster, e.g. run.output_dir=/mnt/shared/runs/NAME).

A cluster with token authentication on (Ray's default once a token exists on the head) gets
its token as Ray's CLI reads it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or
~/.ray/auth_token (launchers/ray_auth.py); without it the command fails naming them.

Follow and control a job (Ray's `ray job status|logs|stop --address ...` work as well):

    python -m launchers.ray_job status JOB_ID [--address http://HOST:8265]
    python -m launchers.ray_job logs JOB_ID [--follow]
    python -m launchers.ray_job stop JOB_ID      # the driver checkpoints, then stops
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from launchers import ray_auth
from launchers.common import REPO, RESOLVED_GROUP, job_name, write_overlay
from orchestrator.config.compose import conf_dir
from orchestrator.errors import ConfigError, OrchestratorError

ENTRYPOINT = (
    f'ORCHESTRATOR_CONF="$PWD/conf" python -m orchestrator "hydra.searchpath=[file://$PWD]" +{RESOLVED_GROUP}=config'
)
STOP_GRACE_S = "120"


def client(address: str):
    """A Jobs API client for `address`, presenting the cluster's auth token (launchers/ray_auth.py)."""
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # ray without the [default] extra has no Jobs client
        raise ConfigError(f"the Ray Jobs client is not installed ({exc}); pip install 'ray[default]'") from exc
    try:
        return JobSubmissionClient(address, headers=ray_auth.http_headers())
    except AuthenticationError:  # the constructor's first request is an authenticated one
        raise ray_auth.rejected(address) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Ray Jobs API at cluster.address={address!r} ({str(exc).splitlines()[0]}). "
            "Give the head's dashboard address (http://HOST:8265; start Ray with `ray start --head "
            "--dashboard-host=0.0.0.0`), or port-forward it, or use cluster=ray to attach directly."
        ) from exc


def runtime_env(cfg, working_dir: Path) -> dict[str, Any]:
    c = cfg.cluster
    env = {"RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S, "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in c.forward_env if k in os.environ})
    env.update(c.env)
    renv: dict[str, Any] = {"working_dir": str(working_dir), "env_vars": env}
    if c.upload_code:
        renv["py_modules"] = [str(REPO / "orchestrator"), str(REPO / "launchers")]
    if c.pip:
        renv["pip"] = list(c.pip)
    return renv


def stage(cfg, choices: dict[str, str]) -> Path:
    """<run dir>/launch: what the job's working_dir uploads (resolved config + conf/)."""
    launch = Path(cfg.run.output_dir).resolve() / "launch"
    write_overlay(cfg, choices, launch)
    shutil.rmtree(launch / "conf", ignore_errors=True)
    shutil.copytree(conf_dir(), launch / "conf")
    return launch


def submit(cfg, choices: dict[str, str]) -> dict[str, Any]:
    from orchestrator.plan import preflight  # on use: the plan imports torch and transformers

    preflight(cfg)  # before rendering: plan.auto may change the micro-batch
    c = cfg.cluster
    jobs = client(c.address)  # unreachable cluster: fail before writing anything
    working_dir = stage(cfg, choices)
    sub_id = c.submission_id or f"{job_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    renv = runtime_env(cfg, working_dir)
    try:
        job_id = jobs.submit_job(
            entrypoint=ENTRYPOINT,
            submission_id=sub_id,
            runtime_env=renv,
            entrypoint_num_cpus=c.entrypoint_num_cpus or None,
            metadata={"run_name": cfg.run.name, "run_dir": str(working_dir.parent)},
        )
    except RuntimeError as exc:  # the API answers errors (duplicate id, bad runtime_env) this way
        raise OrchestratorError(f"the Ray Jobs API rejected the job: {exc}") from exc
    a = f"--address {c.address}"
    print(
        f"submitted Ray job {job_id} to {c.address}\n"
        f"  follow:  python -m launchers.ray_job logs {job_id} --follow {a}   (or: ray job logs -f {job_id} {a})\n"
        f"  status:  python -m launchers.ray_job status {job_id} {a}\n"
        f"  stop:    python -m launchers.ray_job stop {job_id} {a}   (checkpoints first)\n"
        f"  run dir: {working_dir.parent}"
    )
    handle = {"job_id": job_id, "address": c.address, "working_dir": str(working_dir), "runtime_env": renv}
    if c.follow:
        handle["status"] = follow(jobs, job_id)
    return handle


def follow(jobs, job_id: str) -> str:
    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    info = jobs.get_job_info(job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    if status != "SUCCEEDED":
        raise OrchestratorError(f"Ray job {job_id} ended {status}: {info.message or ''}".strip())
    return status


def _command(jobs, args: argparse.Namespace) -> None:
    if args.command == "status":
        info = jobs.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs" and args.follow:
        follow(jobs, args.job_id)
    elif args.command == "logs":
        print(jobs.get_job_logs(args.job_id), end="")
    else:
        print(f"{args.job_id}: stop {'requested' if jobs.stop_job(args.job_id) else 'not needed (not running)'}")


def main(argv: Optional[list] = None) -> int:
    default = os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"
    p = argparse.ArgumentParser(prog="python -m launchers.ray_job", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", default=default, help=f"Ray Jobs API address (default {default})")
    p.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    args = p.parse_args(argv)
    from ray.exceptions import AuthenticationError

    try:
        _command(client(args.address), args)
    except AuthenticationError:  # the cluster's token changed since the client was made
        exc = ray_auth.rejected(args.address)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:  # e.g. an unknown job id
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
