"""Export and import targets are checked when asked for: a bucket or key S3 would
refuse is a 400 at once, through both APIs, and nothing is created -- not a 200
followed by a failure in the background (issue: tester's items 2 and 8)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from fixtures_http import SECRET, Served, refused_400
from snapfs.errors import InvalidArgument
from snapfs.objects import check_object_target

INST = "/instance/v1/zones/fr-par-1"
BLK = "/block/v1/zones/fr-par-1"

#: (bucket, key, the argument refused)
BAD_TARGETS = [
    ("Bad Bucket!", "k", "bucket"), ("b", "k", "bucket"), ("ab", "k", "bucket"),
    ("x" * 64, "k", "bucket"), ("-abc", "k", "bucket"), ("abc-", "k", "bucket"),
    ("a..b", "k", "bucket"), ("192.168.5.4", "k", "bucket"), ("UPPER", "k", "bucket"),
    ("", "k", "bucket"), ("bucket", "", "key"), ("bucket", "a\x00b", "key"),
    ("bucket", "k" * 1100, "key"), ("bucket", "é" * 513, "key"),
]


def _raw(served: Served, method: str, path: str, **kw: Any) -> requests.Response:
    return requests.request(method, served.url + path, headers={"X-Auth-Token": SECRET},
                            timeout=30, **kw)


def _everything(served: Served) -> list[Any]:
    """Every snapshot of the zone as both APIs show it."""
    return [_raw(served, "GET", f"{INST}/snapshots", params={"per_page": 100}).json(),
            _raw(served, "GET", f"{BLK}/snapshots", params={"page_size": 100}).json()]


@pytest.mark.parametrize("bucket, key, argument", BAD_TARGETS)
def test_the_checker_names_what_s3_would_refuse(bucket: str, key: str, argument: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_object_target(bucket, key)
    assert exc.value.field == argument


@pytest.mark.parametrize("bucket, key", [("abc", "k"), ("my.bucket-1", "a/b c/é\t.qcow2"),
                                         ("x" * 63, "k" * 1024), ("1.2.3", "k")])
def test_the_checker_accepts_what_s3_accepts(bucket: str, key: str) -> None:
    assert check_object_target(bucket, key) == (bucket, key)


@pytest.fixture(scope="module")
def available(served_s3: Served) -> str:
    r = _raw(served_s3, "POST", f"{INST}/snapshots",
             json={"name": "src", "volume_id": served_s3.volumes["vol-a"]["id"]})
    assert r.status_code == 201, r.text
    snap_id = str(r.json()["snapshot"]["id"])
    deadline = time.monotonic() + 60
    while _raw(served_s3, "GET", f"{INST}/snapshots/{snap_id}").json()["snapshot"]["state"] \
            != "available":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return snap_id


@pytest.mark.s3
@pytest.mark.parametrize("bucket, key, argument", BAD_TARGETS)
def test_bad_targets_are_400_at_once_and_create_nothing(
        served_s3: Served, available: str, bucket: str, key: str, argument: str) -> None:
    before = _everything(served_s3)
    target = {"bucket": bucket, "key": key}
    refused_400(_raw(served_s3, "POST", f"{INST}/snapshots", json={"name": "imp", **target}),
             argument)
    refused_400(_raw(served_s3, "POST", f"{BLK}/snapshots/import-from-object-storage",
                  json={"name": "imp", **target}), argument)
    refused_400(_raw(served_s3, "POST", f"{INST}/snapshots/{available}/export", json=target),
             argument)
    refused_400(_raw(served_s3, "POST", f"{BLK}/snapshots/{available}/export-to-object-storage",
                  json=target), argument)
    assert _everything(served_s3) == before


@pytest.mark.s3
def test_an_export_task_reads_the_same_from_export_and_get_task(
        served_s3: Served, available: str, bucket: str) -> None:
    r = _raw(served_s3, "POST", f"{INST}/snapshots/{available}/export",
             json={"bucket": bucket, "key": "same.qcow2"})
    assert r.status_code == 200, r.text
    task = r.json()["task"]
    assert task["href_from"] == f"/snapshots/{available}/export"
    got = _raw(served_s3, "GET", f"{INST}/tasks/{task['id']}").json()["task"]
    stable = ("id", "description", "href_from", "href_result", "started_at", "zone")
    assert {k: got[k] for k in stable} == {k: task[k] for k in stable}
    deadline = time.monotonic() + 60
    while _raw(served_s3, "GET", f"{INST}/tasks/{task['id']}").json()["task"]["status"] \
            not in ("success", "failure"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
