"""`snapfs serve` checks every parameter the same way on the Instance, Block and
Account routes: what the API would refuse is a 400 naming it, and nothing changes;
an empty filter is no filter (the SDKs send ``tags=`` for an empty list)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from fixtures_http import SECRET, Served, refused_400

INST = "/instance/v1/zones/fr-par-1"
BLK = "/block/v1/zones/fr-par-1"


def _raw(served: Served, method: str, path: str, **kw: Any) -> requests.Response:
    headers = kw.pop("headers", {"X-Auth-Token": SECRET})
    return requests.request(method, served.url + path, headers=headers, timeout=30, **kw)


def _everything(served: Served) -> list[Any]:
    """Every snapshot and volume of the zone as both APIs show them."""
    return [_raw(served, "GET", f"{INST}/snapshots", params={"per_page": 100}).json(),
            _raw(served, "GET", f"{BLK}/snapshots", params={"page_size": 100}).json(),
            _raw(served, "GET", f"{BLK}/volumes", params={"page_size": 100}).json()]


@pytest.fixture(scope="module")
def snapshot_id(served: Served) -> str:
    r = _raw(served, "POST", f"{INST}/snapshots",
             json={"name": "params-base", "volume_id": served.volumes["vol-a"]["id"],
                   "tags": ["kept"]})
    assert r.status_code == 201, r.text
    snap_id = str(r.json()["snapshot"]["id"])
    deadline = time.monotonic() + 60  # settled: listings compared before/after stay equal
    while _raw(served, "GET", f"{INST}/snapshots/{snap_id}").json()["snapshot"]["state"] \
            != "available":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return snap_id


@pytest.mark.parametrize("size", [1, 512, 8 << 20])
def test_a_size_with_a_volume_is_400(served: Served, snapshot_id: str, size: int) -> None:
    before = _everything(served)
    refused_400(_raw(served, "POST", f"{INST}/snapshots",
                  json={"name": "t", "volume_id": served.volumes["vol-a"]["id"],
                        "size": size}), "size")
    assert _everything(served) == before


@pytest.mark.parametrize("path, name", [
    (f"{INST}/snapshots", "tags"), (f"{BLK}/snapshots", "tags"), (f"{BLK}/volumes", "tags"),
    (f"{BLK}/volumes", "volume_ids"), ("/account/v3/projects", "project_ids")])
@pytest.mark.parametrize("value", ["", ",", ",,"])
def test_an_empty_filter_is_no_filter(served: Served, snapshot_id: str, path: str,
                                      name: str, value: str) -> None:
    unfiltered = _raw(served, "GET", path)
    assert unfiltered.status_code == 200 and unfiltered.json()["total_count"] > 0
    r = _raw(served, "GET", path, params={name: value})
    assert r.status_code == 200, r.text
    assert r.json() == unfiltered.json()


@pytest.mark.parametrize("path, params, argument", [
    ("/account/v3/projects", {"page_size": "0"}, "page_size"),
    ("/account/v3/projects", {"page": "0"}, "page"),
    ("/block/v1/zones/xx/volume-types", {}, "zone"),
    ("/block/v1/zones/fr-par-9/volume-types", {}, "zone"),
    (f"{BLK}/volumes", {"volume_type": "bad"}, "volume_type"),
    (f"{BLK}/volumes", {"volume_type": "unified"}, "volume_type"),  # Block's name: sbs_5k
    (f"{BLK}/volumes", {"include_deleted": "banana"}, "include_deleted"),
    (f"{BLK}/volumes", {"project_id": "foo"}, "project_id"),
    (f"{BLK}/snapshots", {"include_deleted": "banana"}, "include_deleted"),
    (f"{BLK}/snapshots", {"project_id": "foo"}, "project_id"),
    (f"{BLK}/snapshots", {"volume_id": "bad"}, "volume_id"),
    (f"{INST}/snapshots", {"project": "foo"}, "project"),
    (f"{INST}/snapshots", {"base_volume_id": "bad"}, "base_volume_id"),
])
def test_unchecked_parameters_are_400(served: Served, path: str, params: dict[str, str],
                                      argument: str) -> None:
    refused_400(_raw(served, "GET", path, params=params), argument)


@pytest.mark.parametrize("value", ["false", "False", "true", "0", "1"])
def test_booleans_as_the_sdks_send_them(served: Served, value: str) -> None:
    for path in (f"{BLK}/snapshots", f"{BLK}/volumes"):
        r = _raw(served, "GET", path, params={"include_deleted": value})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", ["２", "٣", "1_0", "+5", " 5", "5 ", "0x10", "5\n"])
@pytest.mark.parametrize("path, names", [
    (f"{INST}/snapshots", ("per_page", "page")), (f"{INST}/volumes", ("per_page", "page")),
    (f"{BLK}/snapshots", ("page_size", "page")), (f"{BLK}/volumes", ("page_size", "page")),
    ("/account/v3/projects", ("page_size", "page"))])
def test_paging_numbers_are_ascii_digits_only(served: Served, path: str,
                                              names: tuple[str, str], value: str) -> None:
    for name in names:
        refused_400(_raw(served, "GET", path, params={name: value}), name)
    assert _raw(served, "GET", path, params={names[0]: "10", names[1]: "1"}).status_code == 200


@pytest.mark.parametrize("path, body, argument", [
    (f"{BLK}/volumes", {"name": "v", "from_empty": {"size": 1 << 30, "bogus": 1}},
     "from_empty.bogus"),
    (f"{BLK}/volumes", {"name": "v", "from_empty": {"size": 1 << 30}, "project_id": "bad"},
     "project_id"),
    (f"{BLK}/snapshots", {"name": "s", "volume_id": "<vol-a>", "project_id": "bad"},
     "project_id"),
    (f"{BLK}/snapshots/import-from-object-storage",
     {"name": "s", "bucket": "bkt", "key": "k", "project_id": "bad"}, "project_id"),
])
def test_block_bodies_are_checked_under_block_names(served: Served, snapshot_id: str,
                                                    path: str, body: dict[str, Any],
                                                    argument: str) -> None:
    if body.get("volume_id") == "<vol-a>":
        body = {**body, "volume_id": served.volumes["vol-a"]["id"]}
    before = _everything(served)
    refused_400(_raw(served, "POST", path, json=body), argument)
    assert _everything(served) == before


def _spellings(ident: str) -> list[str]:
    """The forms of a UUID that are not the API's (lower-case 8-4-4-4-12)."""
    return [ident.upper(), "{" + ident + "}", ident.replace("-", ""), "urn:uuid:" + ident,
            ident[:-1], "not-a-uuid"]


def test_ids_are_canonical_uuids_in_bodies_and_paths_alike(served: Served,
                                                          snapshot_id: str) -> None:
    """Scaleway's IDs are lower-case and compared as given: any other spelling is a
    400 naming the argument, in a body as in a path (it was accepted in one and a
    404 in the other)."""
    vol = served.volumes["vol-a"]["id"]
    before = _everything(served)
    for bad in _spellings(vol):
        refused_400(_raw(served, "POST", f"{INST}/snapshots",
                      json={"name": "s", "volume_id": bad}), "volume_id")
        refused_400(_raw(served, "POST", f"{BLK}/snapshots",
                      json={"name": "s", "volume_id": bad}), "volume_id")
        refused_400(_raw(served, "GET", f"{INST}/volumes/{bad}"), "volume_id")
        refused_400(_raw(served, "GET", f"{BLK}/volumes/{bad}"), "volume_id")
    for bad in _spellings(snapshot_id):
        for method in ("GET", "PATCH", "DELETE"):
            refused_400(_raw(served, method, f"{INST}/snapshots/{bad}", json={}), "snapshot_id")
            refused_400(_raw(served, method, f"{BLK}/snapshots/{bad}", json={}), "snapshot_id")
        refused_400(_raw(served, "GET", f"{INST}/tasks/{bad}"), "task_id")
    for bad in _spellings(served.default_project):
        refused_400(_raw(served, "POST", f"{INST}/snapshots",
                      json={"name": "s", "volume_id": vol, "project": bad}), "project")
    assert _everything(served) == before
    assert _raw(served, "GET", f"{INST}/volumes/{vol}").status_code == 200
