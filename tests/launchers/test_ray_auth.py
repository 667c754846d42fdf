"""Ray token authentication, against a real Ray head started with auth on (conftest.ray_head:
`ray start --head` finds a token and turns auth on, as it does on any machine where Ray ran
before). The clients run as a user runs them, in subprocesses with only the Ray auth
variables of each case set: `python -m orchestrator ... cluster=ray_job`, `... cluster=ray`
and `python -m launchers.ray_job`. With the token they work; without it (or with another
one) they fail at once with one line naming what to set, and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import ray_job
from tests.launchers.conftest import TINY, RayHead

TRACEBACKS = ("Traceback", "Check failed", "AuthenticationError")


def run(head: RayHead, args: list[str], timeout: float = 300, **auth: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=head.env(**auth)
    )


def no_token_cases(head: RayHead, tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Client environments that cannot authenticate, and the message each one gets."""
    missing = str(tmp_path / "no-such-token")
    return {
        "none": ({}, "requires token authentication and no token was found here: set RAY_AUTH_TOKEN"),
        "disabled": (
            {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": str(head.token_path)},
            "RAY_AUTH_MODE=disabled is set here",
        ),
        "wrong": ({"RAY_AUTH_TOKEN": "0" * 64}, "it refused the token from RAY_AUTH_TOKEN: set RAY_AUTH_TOKEN"),
        "mode_token": ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but no Ray auth token was found"),
        "bad_path": (
            {"RAY_AUTH_TOKEN_PATH": missing},
            f"cannot read the Ray auth token from RAY_AUTH_TOKEN_PATH ({missing})",
        ),
    }


def test_the_token_is_read_in_rays_order(tmp_path, monkeypatch):
    """RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (Ray's
    own loader reads them); RAY_AUTH_MODE decides whether it is sent."""
    from launchers import ray_auth
    from orchestrator.errors import ConfigError

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "file").write_text("from-file")
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert (ray_auth.load_token(), ray_auth.source()) == ("from-home", "~/.ray/auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "file"))
    assert ray_auth.load_token() == "from-file" and ray_auth.source().startswith("RAY_AUTH_TOKEN_PATH (")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert (ray_auth.load_token(), ray_auth.source()) == ("from-env", "RAY_AUTH_TOKEN")
    assert ray_auth.http_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth.http_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read the Ray auth token from RAY_AUTH_TOKEN_PATH"):
        ray_auth.token_to_send()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=token but no Ray auth token was found: set RAY_AUTH_TOKEN"):
        ray_auth.token_to_send()


def test_jobs_cli_with_and_without_the_token(ray_head, tmp_path, monkeypatch):
    """`python -m launchers.ray_job status`: works with the token from RAY_AUTH_TOKEN or the
    file RAY_AUTH_TOKEN_PATH names; each environment without a usable token gets its line."""
    ray_head.use_token(monkeypatch)
    job_id = ray_job.client(ray_head.address).submit_job(entrypoint="echo authenticated")
    cli = ["-m", "launchers.ray_job", "status", job_id, "--address", ray_head.address]
    for auth in (
        {"RAY_AUTH_TOKEN_PATH": str(ray_head.token_path)},
        {"RAY_AUTH_TOKEN": ray_head.token_path.read_text()},
    ):
        done = run(ray_head, cli, **auth)
        assert done.returncode == 0 and done.stdout.startswith(f"{job_id}: "), done.stderr
    for name, (auth, message) in no_token_cases(ray_head, tmp_path).items():
        done = run(ray_head, cli, **auth)
        assert done.returncode == 2, (name, done.stderr)
        assert message in done.stderr and "ray get-auth-token" in done.stderr, (name, done.stderr)
        assert not [t for t in TRACEBACKS if t in done.stderr], (name, done.stderr)


@pytest.mark.slow
def test_submit_in_a_subprocess_with_and_without_the_token(ray_head, tmp_path):
    """`python -m orchestrator ... cluster=ray_job`: without the token, one line and nothing
    staged; with RAY_AUTH_TOKEN set, the job runs (its driver attaching with the head's token)."""
    run_dir = tmp_path / "run"
    args = [
        "-m",
        "orchestrator",
        *TINY,
        f"run.output_dir={run_dir}",
        "cluster=ray_job",
        f"cluster.address={ray_head.address}",
    ]
    done = run(ray_head, args)
    assert done.returncode == 2 and "no token was found here" in done.stderr, done.stderr
    assert not [t for t in TRACEBACKS if t in done.stderr] and not (run_dir / "launch").exists()

    done = run(
        ray_head,
        [*args, "train.max_steps=2", "cluster.follow=true"],
        600,
        RAY_AUTH_TOKEN=ray_head.token_path.read_text(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run complete: 2 steps" in done.stdout + done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_attach_with_and_without_the_token(ray_head, tmp_path):
    """`python -m orchestrator ... cluster=ray cluster.address=HOST:PORT`: with the token file
    (RAY_AUTH_TOKEN_PATH, no RAY_AUTH_MODE) the run trains on the cluster; without a usable
    token it fails within seconds (not after Ray's reconnect attempts, and RAY_AUTH_MODE=token
    without a token is a message, not the process aborting inside Ray)."""
    run_dir = tmp_path / "run"
    args = ["-m", "orchestrator", *TINY, f"run.output_dir={run_dir}", "cluster=ray", f"cluster.address={ray_head.gcs}"]
    cases = no_token_cases(ray_head, tmp_path)
    for name in ("none", "wrong", "mode_token"):
        auth, message = cases[name]
        started = time.monotonic()
        done = run(ray_head, args, **auth)
        assert done.returncode == 2, (name, done.stderr[-3000:])
        assert message in done.stderr and not [t for t in TRACEBACKS if t in done.stderr], (name, done.stderr[-3000:])
        assert time.monotonic() - started < 120, name

    done = run(ray_head, [*args, "train.max_steps=2"], 600, RAY_AUTH_TOKEN_PATH=str(ray_head.token_path))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
