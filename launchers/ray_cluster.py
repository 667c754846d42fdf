"""cluster=ray: attach to a running Ray cluster and run the driver in this process.

Every node must have this package installed (our docker image, or the same environment
on each node); the checkpoint directory must be on storage all nodes share.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from launchers import ray_auth
from orchestrator.errors import ConfigError

log = logging.getLogger("orchestrator")


def run_attached(cfg, choices: dict[str, str]) -> dict[str, Any]:
    import ray

    from orchestrator.chain import resolve_init_from
    from orchestrator.driver import Driver
    from orchestrator.runlock import RunDirLock

    with RunDirLock(cfg.run.output_dir):  # before connecting: a busy run dir is refused at once
        if not ray.is_initialized():
            connect(cfg.cluster.address, cfg.cluster.connect_timeout_s)
        try:
            cfg = resolve_init_from(cfg, choices, _run_connected)  # chained stages run here first
            return Driver(cfg, choices).run()
        finally:
            ray.shutdown()


def _run_connected(cfg, choices: dict[str, str]) -> dict[str, Any]:
    """A chained stage on the cluster this process is already attached to."""
    from orchestrator.chain import resolve_init_from
    from orchestrator.driver import Driver

    return Driver(resolve_init_from(cfg, choices, _run_connected), choices).run()


def _unreachable(address: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot reach a Ray cluster at cluster.address={address!r} ({why}). Start one with "
        "`ray start --head` on the head node and pass its address (host:6379), or run on this "
        "machine alone with cluster=local."
    )


def _resolve(address: str) -> tuple[str, int, bool]:
    """(host, port, is_gcs) of what `ray.init(address)` would connect to: `auto` finds the
    cluster started on this node; a `ray://` address is a Ray Client server, not a GCS."""
    if address.startswith("ray://"):
        hostport, is_gcs = address[len("ray://") :].split("/")[0], False
    else:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            hostport, is_gcs = canonicalize_bootstrap_address_or_die(address), True
        except (ConnectionError, ValueError) as exc:
            raise _unreachable(address, str(exc)) from exc
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise _unreachable(address, "expected host:port")
    return host.strip("[]"), int(port), is_gcs


def _gcs_answers(host: str, port: int, timeout_s: float) -> str | None:
    """None when a Ray GCS answers at host:port within about `timeout_s`; else why not. A GCS
    that wants a token this process does not have raises the message saying which to set."""
    try:
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # private API moved: ray.init's own checks remain
        return None
    try:
        InnerGcsClient.standalone(f"{host}:{port}", None, int(max(timeout_s, 1) * 1000))
    except AuthenticationError:
        raise ray_auth.rejected(f"{host}:{port}") from None
    except Exception as exc:  # noqa: BLE001  (RpcError: something listens there, but not a Ray GCS)
        return f"something listens on {host}:{port} but no Ray GCS answered: {exc}"
    return None


def connect(address: str, timeout_s: float) -> None:
    """`ray.init(address)` that fails within about `timeout_s` with our message.

    Ray itself retries an unreachable GCS for many minutes, printing its own connection
    lines. A plain TCP connect is tried first, once a second until `timeout_s` (a cluster
    may still be starting), then one bounded GCS handshake; only then does Ray connect. The
    cluster's auth token is presented as Ray's CLI would (launchers/ray_auth.py).
    """
    import ray

    host, port, is_gcs = _resolve(address)
    deadline, waiting, why = time.monotonic() + timeout_s, False, "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                break
        except OSError as exc:
            why = f"{host}:{port}: {exc.strerror or exc}"
        if time.monotonic() + 1 > deadline:
            raise _unreachable(address, f"{why}, for {timeout_s:g}s")
        if not waiting:
            log.info("waiting up to %gs for the Ray cluster at %s:%d (%s)", timeout_s, host, port, why)
            waiting = True
        time.sleep(1)
    ray_auth.prepare_gcs_client()  # token auth: Ray aborts the process when the token is missing
    if is_gcs:
        why = _gcs_answers(host, port, max(1.0, deadline - time.monotonic()))
        if why is not None:
            raise _unreachable(address, why)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise _unreachable(address, str(exc)) from exc
