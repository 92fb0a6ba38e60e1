"""What every process of the Ray Serve application shares: its names and the server's settings,
handed to each replica's process as JSON in its environment."""
from __future__ import annotations

import json
import os

from hotpeft.server.config import Settings

SETTINGS_ENV = "HOTPEFT_RAY_SETTINGS"  # the settings as JSON, handed to every replica's process
APP_NAME = "hotpeft"
REPLICA = "EngineReplica"
BASE_ID = ""  # the multiplexed id of base-only requests: no adapter to prefer a replica for


def settings_json(settings: Settings, *, keys: bool) -> str:
    """The settings for a replica's process. The keys and `--adapters-dir` only for the ingress:
    engine replicas take no HTTP, and one process registering the folders is enough (several
    registering the same folder at once could each add a version)."""
    data = settings.model_dump(mode="json", exclude={"api_key", "admin_key", "ray", "ray_address"})
    if not keys:
        data["adapters_dir"] = None
    if keys:
        data["api_key"] = [k.get_secret_value() for k in settings.api_key]
        data["admin_key"] = [k.get_secret_value() for k in settings.admin_key]
    return json.dumps(data)


def settings_from_env() -> Settings:
    raw = os.environ.get(SETTINGS_ENV)
    return Settings(**json.loads(raw)) if raw else Settings()
