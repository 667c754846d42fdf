"""Ray token authentication for the launchers that talk to a running Ray cluster
(cluster=ray, cluster=ray_job and `python -m launchers.ray_job`).

Ray's `ray start --head` turns token authentication on when a token exists on the head
node (the first `ray.init()` on a machine writes one to ~/.ray/auth_token); every client
must then present the cluster's token. The token is read the way Ray's CLI reads it, with
Ray's own loader, from the first of:

    RAY_AUTH_TOKEN        the token itself
    RAY_AUTH_TOKEN_PATH   a file holding it
    ~/.ray/auth_token     the default file

`ray get-auth-token` on the head node prints the cluster's token. RAY_AUTH_MODE decides
whether it is sent: `disabled` sends none; `token` requires one (its absence is an error
here, before Ray would abort the process); unset sends the token when one is found, as
`ray start` and `ray.init()` do for a cluster on this machine. A cluster that turns a
request down (no token, or not its token) fails with one message naming the variable or
file to set, instead of Ray's traceback or its minutes of reconnecting.
"""

from __future__ import annotations

import os
from typing import Optional

from orchestrator.errors import ConfigError

MODE_VAR = "RAY_AUTH_MODE"
SOURCES = "RAY_AUTH_TOKEN (the token), RAY_AUTH_TOKEN_PATH (a file holding it) or ~/.ray/auth_token"
GET_TOKEN = "`ray get-auth-token` on the cluster's head node prints its token"


def mode() -> Optional[str]:
    """RAY_AUTH_MODE as set here (lower case), or None when unset."""
    return os.environ.get(MODE_VAR, "").strip().lower() or None


def source() -> str:
    """Where Ray's loader takes the token from, in its order, for messages."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def load_token() -> Optional[str]:
    """The token Ray's CLI would use (`ray get-auth-token` reads it the same way), or None."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the variables may have changed since Ray last looked
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return None
        return loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        detail = exc.message.strip().rstrip(".")
        raise ConfigError(f"cannot read the Ray auth token from {source()}: {detail}. {GET_TOKEN}.") from None


def token_to_send() -> Optional[str]:
    """The token to present, by RAY_AUTH_MODE (see the module docstring)."""
    if mode() == "disabled":
        return None
    token = load_token()
    if token is None and mode() == "token":
        raise ConfigError(f"{MODE_VAR}=token but no Ray auth token was found: set {SOURCES}. {GET_TOKEN}.")
    return token


def http_headers() -> dict[str, str]:
    """Headers for the Ray Jobs API (the dashboard's HTTP server)."""
    token = token_to_send()
    return {"Authorization": f"Bearer {token}"} if token else {}


def prepare_gcs_client() -> None:
    """Before this process talks to a GCS (ray.init, a GCS client): token mode when a token is
    to be sent. Ray enables it by itself only for a cluster found on this machine."""
    if token_to_send() is not None and mode() != "token":
        from ray._raylet import Config

        os.environ[MODE_VAR] = "token"
        Config.initialize("")  # Ray reads the mode from its config, which caches the variable


def rejected(address: str) -> ConfigError:
    """The cluster at `address` turned this client down for want of its token."""
    if mode() == "disabled":
        why, fix = f"{MODE_VAR}=disabled is set here, so no token was sent", f"unset {MODE_VAR} and set {SOURCES}"
    elif load_token() is None:
        why, fix = "no token was found here", f"set {SOURCES}"
    else:
        why = f"it refused the token from {source()}"
        fix = "set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it)"
    return ConfigError(f"the Ray cluster at {address} requires token authentication and {why}: {fix}. {GET_TOKEN}.")
