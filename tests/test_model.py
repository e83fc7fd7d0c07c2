"""The resource model: API JSON shape (checked by the official SDK), validators,
and the one errno/HTTP table."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from scaleway.instance.v1.marshalling import unmarshal_Snapshot, unmarshal_Task

from snapfs import errors
from snapfs.errors import InvalidArgument, errno_for, http_status_for
from snapfs.model import (BaseVolume, Snapshot, Task, check_name, check_paging, check_tags,
                          check_zone)


def make_snapshot(**over: object) -> Snapshot:
    base = dict(id="6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01", name="db-nightly",
                organization="11111111-2222-3333-4444-555555555555",
                project="11111111-2222-3333-4444-555555555555", tags=["prod", "db"],
                volume_type="b_ssd", size=20 << 30, state="available",
                base_volume=BaseVolume("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "db-vol"),
                creation_date="2026-11-27T10:00:00.123456+00:00",
                modification_date="2026-11-27T10:05:00+00:00", error_reason=None,
                zone="fr-par-1")
    base.update(over)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_snapshot_json_is_what_the_official_sdk_reads() -> None:
    snap = make_snapshot()
    sdk = unmarshal_Snapshot(snap.to_api())
    assert sdk.id == snap.id
    assert sdk.name == snap.name
    assert sdk.organization == snap.organization
    assert sdk.project == snap.project
    assert sdk.tags == ["prod", "db"]
    assert sdk.volume_type == "b_ssd"
    assert sdk.size == 20 << 30
    assert sdk.state == "available"
    assert sdk.base_volume is not None
    assert (sdk.base_volume.id, sdk.base_volume.name) == ("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                                                          "db-vol")
    assert sdk.creation_date is not None and sdk.creation_date.isoformat() == snap.creation_date
    assert sdk.modification_date is not None
    assert sdk.modification_date.isoformat() == snap.modification_date
    assert sdk.error_reason is None
    assert sdk.zone == "fr-par-1"


def test_imported_snapshot_has_null_base_volume_and_error_reason_round_trips() -> None:
    snap = make_snapshot(base_volume=None, state="invalid_data", error_reason="bad magic")
    sdk = unmarshal_Snapshot(snap.to_api())
    assert sdk.base_volume is None
    assert sdk.state == "invalid_data"
    assert sdk.error_reason == "bad magic"
    assert Snapshot.from_api(snap.to_api()) == snap


def test_task_json_is_what_the_official_sdk_reads() -> None:
    task = Task(id="6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c02", description="export_snapshot",
                progress=40, status="started", zone="fr-par-1",
                started_at="2026-11-27T10:00:00+00:00")
    sdk = unmarshal_Task(task.to_api())
    assert (sdk.id, sdk.progress, sdk.status, sdk.zone) == (task.id, 40, "started", "fr-par-1")


@pytest.mark.parametrize("data, field", [
    ([], "snapshot"),
    ({"name": "x"}, "base_volume"),
    ({**make_snapshot().to_api(), "extra": 1}, "extra"),
    ({**make_snapshot().to_api(), "size": "big"}, "size"),
    ({**make_snapshot().to_api(), "tags": "a,b"}, "tags"),
    ({**make_snapshot().to_api(), "name": 5}, "name"),
    ({**make_snapshot().to_api(), "tags": ["a", 1]}, "tags"),
])
def test_from_api_rejects_wrong_shapes(data: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Snapshot.from_api(data)
    assert info.value.field == field


def test_validators() -> None:
    assert check_name("ok name") == "ok name"
    for bad in ("", ".", "..", "a/b", "x" * 256, 5):
        with pytest.raises(InvalidArgument):
            check_name(bad)
    assert check_tags(["b", "a"]) == ["b", "a"]
    for bad_tags in (["a,b"], [""], "a", [1]):
        with pytest.raises(InvalidArgument):
            check_tags(bad_tags)
    assert check_paging(None, None) == (50, 1)
    assert check_paging(100, 3) == (100, 3)
    for pp, pg in ((101, 1), (-1, 1), (10, -2), (0, 1), (10, 0), (10, 10 ** 20)):
        with pytest.raises(InvalidArgument):
            check_paging(pp, pg)
    with pytest.raises(InvalidArgument):
        check_zone("mars-1")


#: One row per clause of the naming rule (README, "Names").
BAD_NAMES = [
    ("", "empty"), (".", "."), ("..", ".."), ("a/b", "'/'"), ("a~b", "'~'"),
    ("new\nline", "control"), ("nul\x00", "control"), ("del\x7f", "control"),
    ("c1\x85", "control"), ("tab\t", "control"), ("bad\udcff", "UTF-8"),
    ("x" * 256, "255 bytes"), ("é" * 128, "255 bytes"),
    ("6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01", "UUID"),
    ("6F1B4A3E7D3C4C559A530D6F3F8B7C01", "UUID"),
    ("{6f1b4a3e-7d3c-4c55-9a53-0d6f3f8b7c01}", "UUID"),
]


@pytest.mark.parametrize("name, why", BAD_NAMES)
def test_the_naming_rule_refuses_and_says_why(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_name(name)
    assert why in str(info.value)


@pytest.mark.parametrize("name", ["web", "a b", "back\\slash", "é" * 127 + "x", "x" * 255,
                                  "-", "6f1b4a3e", "naïve 日本"])
def test_the_naming_rule_accepts(name: str) -> None:
    assert check_name(name) == name


BAD_TAGS = [
    ([""], "empty"), (["."], "."), ([".."], ".."), (["a,b"], "','"), (["a/b"], "'/'"),
    (["a~b"], "'~'"), (["new\nline"], "control"), (["x" * 129], "128 bytes"),
    ([f"t{i}" for i in range(65)], "more than 64"), ("a", "list"), ([1], "list"),
]


@pytest.mark.parametrize("tags, why", BAD_TAGS)
def test_the_tag_rule_refuses_and_says_why(tags: object, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_tags(tags)
    assert why in str(info.value)


def test_tags_drop_duplicates_and_allow_the_limits() -> None:
    assert check_tags(["b", "a", "b", "a"]) == ["b", "a"]
    assert len(check_tags([f"t{i % 64}" for i in range(200)])) == 64
    assert check_tags(["x" * 128]) == ["x" * 128]


@pytest.mark.parametrize("field, value", [
    ("size", 1024), ("zone", "fr-par-2"), ("id", "00000000-0000-4000-8000-000000000001"),
    ("project", "00000000-0000-4000-8000-000000000001"), ("volume_type", "l_ssd"),
    ("base_volume", None), ("creation_date", "2020-01-01T00:00:00+00:00")])
def test_a_set_changing_a_read_only_field_is_refused(field: str, value: object) -> None:
    cur = make_snapshot()
    with pytest.raises(InvalidArgument) as info:
        dataclasses.replace(cur, **{field: value}).check_set(cur)
    assert info.value.field == field
    dataclasses.replace(cur, name="renamed", tags=["x"]).check_set(cur)  # allowed


@pytest.mark.parametrize("field, value", [
    ("state", "snapshotting"), ("state", "error"), ("error_reason", "forged"),
    ("modification_date", "2020-01-01T00:00:00+00:00")])
def test_a_set_with_a_server_driven_field_of_another_time_is_not_refused(
        field: str, value: object) -> None:
    """What a client fetched while a capture ran is sent back after it ended."""
    cur = make_snapshot()
    dataclasses.replace(cur, **{field: value}).check_set(cur)


def test_creation_dates_compare_as_instants() -> None:
    cur = make_snapshot(creation_date="2026-01-02T03:04:05.123456+00:00")
    dataclasses.replace(cur, creation_date="2026-01-02T03:04:05.123Z").check_set(cur)
    with pytest.raises(InvalidArgument):
        dataclasses.replace(cur, creation_date="2026-01-02T03:04:06+00:00").check_set(cur)


def test_every_error_kind_has_one_errno_and_one_http_status() -> None:
    kinds = [c for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, errors.SnapfsError)]
    for kind in kinds:
        assert kind in errors.ERRNO, kind
        assert kind in errors.HTTP_STATUS, kind
    assert errno_for(errors.PreconditionFailed("exporting")) == errno.EBUSY
    assert errno_for(errors.NotFound("snapshot", "x")) == errno.ENOENT
    assert errno_for(InvalidArgument("size", "odd")) == errno.EINVAL
    assert http_status_for(InvalidArgument("size", "odd")) == 400
    assert http_status_for(errors.NotFound("snapshot", "x")) == 404
