"""cluster=slurm: render an sbatch script from the resolved config and submit it.

The script (template `slurm/ray_job.sbatch.j2`) starts Ray on the allocation, head on the
first node and a worker on each other node (srun), each on ports free on its node (so jobs
can share nodes) and with token auth, waits until every node has joined, runs `python -m
orchestrator` with the resolved config attached to that cluster (cluster=ray, see
launchers/common.py), and stops Ray. Every stop checkpoints first:
`--signal=B:USR1@cluster.signal_before_s` before the time limit (the script then requeues
the job: `--requeue`, `scontrol requeue`), and the SIGTERM that a plain `scancel`,
preemption or the time limit sends to every process of the job (Ray and its workers start
with SIGTERM blocked, so they serve the driver's checkpoint until Slurm's SIGKILL, KillWait
seconds later; Slurm requeues a preempted job). A requeued job resumes from the checkpoint
(same run dir).

Everything for the job sits in `<run dir>/launch/`: `resolved/config.yaml`, `job.sbatch`
(submit it again by hand with `sbatch`) and the job's log `slurm-<job id>.out`, appended
across requeues. Before submitting: sbatch must be on PATH, and the partition must exist,
have the nodes, CPUs and (when asked for) GPUs (sinfo). `cluster.dry_run=true` renders,
saves and prints the script without submitting.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2

from launchers.common import REPO, allocation_note, entry_args, job_name, require_tool, shell_join, write_overlay
from orchestrator.errors import ConfigError, OrchestratorError

TEMPLATE = REPO / "slurm" / "ray_job.sbatch.j2"


def cpus_per_node(c) -> int:
    """--cpus-per-task: as set, or enough for the workers that land on one node."""
    return c.cpus_per_node or math.ceil(c.num_workers / c.nodes) * c.cpus_per_worker


def checkpoint_dir(cfg) -> Path:
    """Where the driver keeps checkpoints (as orchestrator.driver.Driver resolves it)."""
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints").resolve()


def render(cfg, choices: dict[str, str]) -> dict[str, Any]:
    """Write the resolved config and the sbatch script into <run dir>/launch; return paths."""
    c = cfg.cluster
    launch = Path(cfg.run.output_dir).resolve() / "launch"
    overlay = write_overlay(cfg, choices, launch)
    script = launch / "job.sbatch"
    # Bash's ${#array[@]} would open a Jinja comment; this template has no comments.
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        comment_start_string="{##",
        comment_end_string="##}",
    )
    env.filters["q"] = lambda v: shell_join([str(v)])
    text = env.from_string(TEMPLATE.read_text()).render(
        c=c,
        run_name=cfg.run.name,
        job_name=c.job_name or job_name(cfg),
        cpus_per_node=cpus_per_node(c),
        overlay=overlay,
        script=script,
        launch=str(launch),
        log=launch / "slurm-%j.out",
        workdir=os.getcwd(),
        env=c.env,
        python=c.python or sys.executable,
        entry=shell_join(entry_args(str(launch))),
        checkpoints=checkpoint_dir(cfg),
    )
    script.write_text(text)
    script.chmod(0o755)
    return {"script": script, "config": overlay, "log_pattern": str(launch / "slurm-%j.out"), "text": text}


def _partitions() -> list[dict[str, str]]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%G|%D|%c"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sinfo failed ({out.stderr.strip()}); is slurmctld reachable?")
    rows = []
    for line in out.stdout.splitlines():
        name, gres, nodes, cpus = line.split("|")
        rows.append(
            {
                "name": name.rstrip("*"),
                "default": name.endswith("*"),
                "gres": gres,
                "nodes": int(nodes),
                "cpus": int(cpus.rstrip("+")),
            }
        )
    return rows


def check_partition(c) -> None:
    """The allocation must fit the partition; Slurm would otherwise queue the job forever
    or reject it with a less helpful message."""
    if shutil.which("sinfo") is None:
        return
    rows = _partitions()
    names = sorted({r["name"] for r in rows})
    match = [r for r in rows if (r["name"] == c.partition if c.partition else r["default"])]
    if not match:
        raise ConfigError(
            f"cluster.partition={c.partition!r} does not exist on this Slurm cluster; partitions: {', '.join(names)}"
            if c.partition
            else f"this Slurm cluster has no default partition; set cluster.partition (one of: {', '.join(names)})"
        )
    name = match[0]["name"]
    if c.gpus_per_node and not any("gpu" in r["gres"] for r in match):
        gpu_parts = sorted({r["name"] for r in rows if "gpu" in r["gres"]})
        raise ConfigError(
            f"cluster.gpus_per_node={c.gpus_per_node} but partition {name!r} has no GPUs (GRES "
            f"{match[0]['gres']}). "
            + (
                f"GPU partitions: {', '.join(gpu_parts)}."
                if gpu_parts
                else "No partition here has GPUs; use cluster.gpus_per_node=0."
            )
        )
    nodes = sum(r["nodes"] for r in match)
    if c.nodes > nodes:
        raise ConfigError(f"cluster.nodes={c.nodes} but partition {name!r} has {nodes} node(s)")
    most = max(r["cpus"] for r in match)
    if cpus_per_node(c) > most:
        raise ConfigError(
            f"{cpus_per_node(c)} CPUs per node asked for (cluster.cpus_per_node, or "
            f"workers x cpus_per_worker per node) but partition {name!r} nodes have {most}"
        )


def submit(cfg, choices: dict[str, str]) -> dict[str, Any]:
    from orchestrator.plan import preflight  # on use: the plan imports torch and transformers

    preflight(cfg)  # before rendering: plan.auto may change the micro-batch
    c = cfg.cluster
    if not c.dry_run:
        require_tool(
            "sbatch",
            "submit to Slurm (run on a Slurm login node, or use cluster.dry_run=true to only render the script)",
        )
    check_partition(c)
    job = render(cfg, choices)
    if allocation_note(c):
        print(allocation_note(c))
    if c.dry_run:
        print(job["text"])
        print(f"# dry run: not submitted. Script: {job['script']}\n# submit it with: sbatch {job['script']}")
        return {"job_id": None, **job}
    out = subprocess.run(["sbatch", "--parsable", str(job["script"])], capture_output=True, text=True)
    if out.returncode != 0:
        raise OrchestratorError(
            f"sbatch rejected the job: {out.stderr.strip() or out.stdout.strip()}\n(script: {job['script']})"
        )
    job_id = out.stdout.strip().split(";")[0]
    log = job["log_pattern"].replace("%j", job_id)
    print(
        f"submitted Slurm job {job_id} ({c.nodes} node(s), {c.num_workers} workers)\n"
        f"  follow:  tail -f {log}\n"
        f"  status:  squeue -j {job_id}   (scontrol show job {job_id})\n"
        f"  stop:    scancel {job_id}   (checkpoints first, within Slurm's KillWait; without a deadline: "
        f"scancel --signal=TERM --batch {job_id})\n"
        f"  checkpoint + requeue now: scancel --signal=USR1 --batch {job_id}\n"
        f"  run dir: {Path(cfg.run.output_dir).resolve()}  (metrics.jsonl, train.log, checkpoints/)\n"
        f"  script:  {job['script']}"
    )
    return {"job_id": job_id, "log": log, **job}
