"""Scaleway credentials and defaults, read the Scaleway way.

``~/.config/scw/config.yaml`` (or $SCW_CONFIG_PATH; profile from --profile, else
$SCW_PROFILE, else the file's top level), overridden by SCW_ACCESS_KEY,
SCW_SECRET_KEY, SCW_DEFAULT_ORGANIZATION_ID, SCW_DEFAULT_PROJECT_ID,
SCW_DEFAULT_ZONE and SCW_API_URL -- the same precedence as the `scw` CLI and
the SDK's ``Profile.from_config_file_and_env``, without its import-time
capture of $SCW_PROFILE and its warning when no file exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from scaleway import Client
from scaleway_core.profile import Profile

from ..errors import InvalidArgument
from ..model import DEFAULT_ZONE, check_zone


def load_client(profile: str | None = None, config_path: str | None = None) -> Client:
    """An SDK client for ``profile``; raises InvalidArgument naming what is wrong."""
    path = Path(Profile.get_default_config_file_path(config_path))
    name = profile or os.environ.get("SCW_PROFILE") or "default"
    if path.exists():
        try:
            from_file = Profile.from_config_file(str(path), name)
        except (ValueError, OSError) as exc:
            raise InvalidArgument("profile", f"{path}: {exc}") from None
        merged = Profile.from_env(force_none=True)
        merged.merge(from_file)
    elif profile not in (None, "default"):
        raise InvalidArgument("profile", f"{profile!r} asked for but {path} does not exist")
    else:
        merged = Profile.from_env()
    if not merged.api_url:
        merged.api_url = "https://api.scaleway.com"
    merged.api_url = merged.api_url.rstrip("/")
    if not merged.default_zone:
        merged.default_zone = DEFAULT_ZONE
    client = Client.from_profile(merged)
    try:
        client.validate()
    except ValueError as exc:
        raise InvalidArgument("scaleway config", str(exc)) from None
    return client


def zones_for(client: Client, extra: list[str] | None) -> list[str]:
    """The default zone first, then --zones in their order, each once."""
    zones = [check_zone(client.default_zone or DEFAULT_ZONE)]
    for zone in extra or []:
        zone = zone.strip()
        if zone and check_zone(zone) not in zones:
            zones.append(zone)
    return zones
