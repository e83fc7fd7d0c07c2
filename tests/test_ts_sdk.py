"""A second official client: the Scaleway TypeScript SDK (npm @scaleway/sdk-client,
sdk-instance, sdk-block, pinned in tests/ts/package.json + package-lock.json and
installed by scripts/setup) runs tests/ts/sdk.test.mjs under `node --test` against
`snapfs serve`, for both the Instance and the Block Storage APIs."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from fixtures_http import ACCESS_KEY, SECRET, Served
from fixtures_store import snapfs_cli

TS = Path(__file__).parent / "ts"
PACKAGES = ("sdk-client", "sdk-instance", "sdk-block")

pytestmark = pytest.mark.s3


def ensure_installed() -> None:
    """The pinned packages, installed by scripts/setup; installed here when missing
    (a checkout where setup has not run since the packages were added)."""
    if all((TS / "node_modules" / "@scaleway" / p).is_dir() for p in PACKAGES):
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed for the TypeScript SDK tests (scripts/setup)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=TS, check=True,
                   capture_output=True, timeout=600)


def test_typescript_sdk_against_serve(served_s3: Served, bucket: str) -> None:
    ensure_installed()
    node = shutil.which("node")
    assert node is not None
    name = f"ts-lssd-{uuid.uuid4().hex[:6]}"
    res = snapfs_cli("volume", "create", name, "--size", "1M", "--type", "l_ssd",
                     store=served_s3.store)
    assert res.returncode == 0, res.stderr
    env: dict[str, Any] = dict(
        os.environ, SNAPFS_URL=served_s3.url, SNAPFS_SECRET=SECRET, SNAPFS_ACCESS=ACCESS_KEY,
        SNAPFS_ORG=served_s3.organization, SNAPFS_PROJECT=served_s3.default_project,
        SNAPFS_VOLUME=served_s3.volumes["vol-a"]["id"], SNAPFS_LSSD=res.stdout.strip(),
        SNAPFS_BUCKET=bucket)
    try:
        run = subprocess.run([node, "--test", "--test-reporter=tap", "sdk.test.mjs"],
                             cwd=TS, env=env, capture_output=True, text=True, timeout=300)
    finally:
        snapfs_cli("volume", "rm", name, store=served_s3.store)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    # Every test ran and passed (a suite that ran nothing must not pass).
    assert "# pass 5" in run.stdout and "# fail 0" in run.stdout, run.stdout[-3000:]
