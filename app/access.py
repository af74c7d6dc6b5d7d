"""Who may start training jobs from the app.

The Launch page starts real ``a3po train`` processes (up to 2000 steps x 256 prompts x 64 rollouts),
so it is only enabled when the server listens on a loopback address, where only this machine can
reach it. ``a3po app --allow-launch`` enables it on other addresses (trusted networks only).

``a3po app`` decides and passes the decision to the server in the environment (``A3PO_ALLOW_LAUNCH``
= 1 or 0, and ``A3PO_HOST``). A server started some other way (``streamlit run app/main.py``) has no
such variables: then the decision follows Streamlit's own ``server.address``, which binds every
interface when unset, so launching is off.
"""

from __future__ import annotations

import ipaddress
import os

ENV_ALLOW = "A3PO_ALLOW_LAUNCH"
ENV_HOST = "A3PO_HOST"


class LaunchDisabled(PermissionError):
    """The launcher was asked to start a job on a server where launching is off."""


def is_loopback(host: str | None) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and the name ``localhost``.

    Any other name is treated as reachable from elsewhere (no DNS lookup: a name can resolve to
    anything), and so are the wildcard addresses 0.0.0.0 and ``::``.
    """
    if not host:
        return False
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def launch_allowed(host: str | None, allow_launch: bool = False) -> bool:
    """The Launch page is on for a loopback bind address, or anywhere with ``--allow-launch``."""
    return bool(allow_launch) or is_loopback(host)


def _streamlit_address() -> str | None:
    try:
        import streamlit as st

        return st.get_option("server.address")
    except Exception:  # no Streamlit config available: treat as "every interface"
        return None


def launch_status() -> tuple[bool, str | None]:
    """(launching allowed, the host the server listens on) for this server process."""
    host = os.environ.get(ENV_HOST) or _streamlit_address()
    flag = os.environ.get(ENV_ALLOW)
    if flag is None:
        return launch_allowed(host), host
    return flag.strip() == "1", host


def disabled_reason(host: str | None) -> str:
    """One sentence: why launching is off and how to turn it on."""
    where = f"on {host}" if host else "on every network interface"
    return (
        f"Launching runs is off because this server listens {where}, where other machines can reach it; "
        "restart it with `a3po app` (localhost only) to launch runs, or add `--allow-launch` on a trusted "
        "network only."
    )


def require_launch_allowed() -> None:
    """Raise ``LaunchDisabled`` unless this server may start jobs (the launcher's own check)."""
    allowed, host = launch_status()
    if not allowed:
        raise LaunchDisabled(disabled_reason(host))
