"""Pure naming and tree rules of the mount (no FUSE, no store)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from snapfs.fs.attributes import xattr_value
from snapfs.errors import InvalidArgument, NotFound
from snapfs.fs import names, transfer
from snapfs.fs.inodes import InodeTable
from snapfs.fs.keys import (ROOT, Key, Kind, View, import_file, may_create_snapshot_in,
                            project_dir, same_place, snapshot_dir, static_child, tag_dir,
                            view_dir, volume_dir, zone_dir)


@dataclass(frozen=True)
class R:
    id: str
    name: str


A = R("aaaaaaaa-0000-4000-8000-000000000001", "web")
B = R("bbbbbbbb-0000-4000-8000-000000000002", "web")
C = R("cccccccc-0000-4000-8000-000000000003", "db")


def test_unique_names_are_listed_as_is() -> None:
    assert list(names.labels([C, R("d" * 8 + "-0000-4000-8000-000000000004", "x")])) == \
        ["db", "x"]


def test_duplicates_get_the_first_8_hex_digits_of_their_id() -> None:
    assert list(names.labels([A, B, C])) == ["web~aaaaaaaa", "web~bbbbbbbb", "db"]


def test_a_label_colliding_with_another_uses_the_full_id() -> None:
    twin = R("aaaaaaaa-1111-4000-8000-000000000005", "web")  # same first 8 hex digits
    labels = names.labels([A, B, twin])
    assert labels["web~aaaaaaaa"] is A
    assert labels[f"web~{twin.id}"] is twin and labels["web~bbbbbbbb"] is B
    assert names.resolve(f"web~{twin.id}", [A, B, twin]) is twin


def test_a_name_shaped_like_a_label_is_escaped_not_taken_for_the_label() -> None:
    """Made before the rule (names now never hold "~"): it cannot squat a label."""
    squatter = R("dddddddd-0000-4000-8000-000000000004", "web~aaaaaaaa")
    labels = names.labels([A, B, squatter])
    assert labels["web~aaaaaaaa"] is A and labels["web~bbbbbbbb"] is B
    assert labels["web\\x7eaaaaaaaa~dddddddd"] is squatter
    assert names.resolve("web\\x7eaaaaaaaa~dddddddd", [A, B, squatter]) is squatter


def test_resolve_by_label_id_and_stale_label() -> None:
    items = [A, B, C]
    assert names.resolve("web~bbbbbbbb", items) is B
    assert names.resolve(A.id, items) is A
    assert names.resolve(A.id.upper(), items) is A
    assert names.resolve("db", items) is C
    assert names.resolve("web", items) is None  # ambiguous: not listed, not resolved
    # Once B is gone, A is listed as "web" and its old label still resolves.
    assert names.resolve("web~aaaaaaaa", [A, C]) is A
    assert names.resolve("web", [A, C]) is A
    assert names.resolve("db~aaaaaaaa", items) is None
    assert names.resolve("nothing", items) is None


def test_label_of_depends_only_on_same_named_items() -> None:
    assert names.label_of(A, [A, B]) == "web~aaaaaaaa"
    assert names.label_of(C, [C]) == "db"
    assert names.candidates_name("web~aaaaaaaa") == "web"
    assert names.candidates_name(f"web~{A.id}") == "web"
    assert names.candidates_name("plain~name") is None  # no valid name holds "~"
    assert names.exact([A, B, C, R("x", "website")], ["web"]) == [A, B]


def test_keys_structure() -> None:
    p = project_dir("fr-par-1", "P")
    snaps = static_child(p, "snapshots")
    assert snaps == view_dir("fr-par-1", "P", View(Kind.SNAPSHOTS))
    assert static_child(p, "volumes") == Key(Kind.VOLUMES, "fr-par-1", "P")
    assert static_child(p, "nope") is None
    vol = volume_dir("fr-par-1", "P", "V")
    s = snapshot_dir(vol, "S")
    image = static_child(s, "image.raw")
    assert image is not None and not image.is_dir
    assert image.parent() == s and s.parent() == vol
    assert vol.parent().parent() == p and p.parent() == zone_dir("fr-par-1")
    assert zone_dir("fr-par-1").parent() == ROOT and ROOT.parent() == ROOT
    assert import_file("fr-par-1", "P", "n").parent() == static_child(p, "imports")
    assert static_child(s, "other") is None


def test_where_snapshots_are_made_and_renamed() -> None:
    vol = volume_dir("z", "P", "V")
    snaps = view_dir("z", "P", View(Kind.SNAPSHOTS))
    assert may_create_snapshot_in(vol)
    assert not may_create_snapshot_in(snaps)
    assert not may_create_snapshot_in(tag_dir("z", "P", "t"))
    assert same_place(snaps, view_dir("z", "P", View(Kind.SNAPSHOTS)))
    assert not same_place(snaps, vol)
    assert not same_place(snaps, view_dir("z", "Q", View(Kind.SNAPSHOTS)))
    assert not same_place(tag_dir("z", "P", "a"), tag_dir("z", "P", "b"))
    assert not same_place(project_dir("z", "P"), project_dir("z", "P"))  # not a view


def test_view_filters() -> None:
    assert View(Kind.SNAPSHOTS).filters() == {}
    assert View(Kind.VOLUME, "V").filters() == {"base_volume_id": "V"}
    assert View(Kind.TAG, "t").filters() == {"tags": ["t"]}


def test_inode_table_is_stable_and_never_reuses() -> None:
    t = InodeTable()
    a, b = Key(Kind.ZONE, "a"), Key(Kind.ZONE, "b")
    ia, ib = t.inode(a), t.inode(b)
    assert ia != ib and t.inode(a) == ia and t.key(ib) == b
    assert t.inode(ROOT) == 1 and t.key(1) == ROOT
    with pytest.raises(NotFound):
        t.key(999)


@pytest.mark.parametrize("text,bucket,key", [
    (b"bucket/key\n", "bucket", "key"),
    (b"s3://my.bucket-1/dir/disk.qcow2", "my.bucket-1", "dir/disk.qcow2"),
    (b"  abc/k\n", "abc", "k"),
    (b"abc/k  \n", "abc", "k  "),  # the key as written (it was stripped: another key)
    (b"abc/k\r\n", "abc", "k"),  # a line as Windows ends it (the key ended in "\r")
    (b"abc/k\r", "abc", "k"),
])
def test_targets(text: bytes, bucket: str, key: str) -> None:
    assert transfer.parse_target(text) == transfer.Target(bucket, key)


@pytest.mark.parametrize("text", [b"", b"\n", b"bucket", b"bucket/", b"Bad_Bucket/k",
                                  b"http://b/k", b"ab/k\nmore\n", b"b\xff/k", b"a/k",
                                  b"a..b/k", b"x" * 5000, b"192.168.1.1/k",
                                  b"bkt/" + b"k" * 1025, b"ab/k\rmore\n", b"ab/k\r\r\n"])
def test_bad_targets(text: bytes) -> None:
    with pytest.raises(InvalidArgument):
        transfer.parse_target(text)


def test_import_status_follows_the_snapshot() -> None:
    from snapfs.model import Snapshot
    target = transfer.Target("b", "k")
    assert transfer.import_status(target, None)["state"] == "pending"
    base = dict(id="i", name="n", organization="o", project="p", tags=[], volume_type="b_ssd",
                size=1024, base_volume=None, creation_date="", modification_date="",
                zone="fr-par-1")
    importing = Snapshot(state="importing", error_reason=None, progress=50, **base)
    st = transfer.import_status(target, importing)
    assert (st["state"], st["progress"], st["bytes"]) == ("started", 50, 512)
    failed = Snapshot(state="invalid_data", error_reason="bad magic", **base)
    st = transfer.import_status(target, failed)
    assert (st["state"], st["error"]) == ("failure", "bad magic")
    done = Snapshot(state="available", error_reason=None, **base)
    assert transfer.import_status(target, done)["state"] == "success"


# --- names the tree cannot show as they are (made before the rule, or elsewhere) ---

D = "dddddddd-0000-4000-8000-000000000004"

UNSHOWABLE = [
    # (stored name, its label with D's short id)
    ("a\nb", "a\\x0ab~dddddddd"),
    ("a/b", "a\\x2fb~dddddddd"),
    ("back\\slash\x7f", "back\\\\slash\\x7f~dddddddd"),
    (".", ".~dddddddd"),
    ("..", "..~dddddddd"),
    ("", "~dddddddd"),
    ("aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000001~dddddddd"),
    ("bad\udcffutf8", "bad\\udcffutf8~dddddddd"),
    ("\x85c1", "\\x85c1~dddddddd"),
]


@pytest.mark.parametrize("stored, label", UNSHOWABLE)
def test_an_unshowable_name_is_listed_escaped_and_resolves(stored: str, label: str) -> None:
    item = R(D, stored)
    assert list(names.labels([item, C])) == [label, "db"]
    assert names.resolve(label, [item, C]) is item
    assert names.resolve(D, [item, C]) is item  # always by its ID too
    assert names.resolve(stored, [item, C]) is None or stored == D
    assert names.candidates_name(label) is None or names.candidates_name(label) == stored
    assert len(label.encode()) <= 255 and "/" not in label and label not in (".", "..")


def test_a_name_equal_to_another_id_never_hides_that_id() -> None:
    """The ID of A means A, whatever the cache holds; the squatter has a label."""
    squatter = R(D, A.id)
    items = [A, squatter]
    assert names.resolve(A.id, items) is A
    assert names.resolve(A.id, [A]) is A
    assert A.id not in names.labels(items)


def test_labels_fit_255_bytes_even_for_long_duplicated_names() -> None:
    long = "é" * 127 + "x"  # 255 bytes: a valid name
    a, b = R(A.id, long), R(B.id, long)
    labels = names.labels([a, b])
    for label, item in labels.items():
        assert len(label.encode()) <= 255
        assert names.resolve(label, [a, b]) is item
        assert names.candidates_name(label) is None  # cut: only a full listing finds it
    huge = R(D, "z" * 70000)
    (label,) = names.labels([huge])
    assert len(label.encode()) <= 255 and names.resolve(label, [huge]) is huge


TAGS = ["ok", "x" * 5000, "y" * 65000, ".", "..", "new\nline", "a/b", "c,d", "t~x"]


def test_every_stored_tag_has_a_distinct_entry_of_at_most_255_bytes() -> None:
    labels = names.tag_labels(TAGS)
    assert sorted(labels.values()) == sorted(TAGS)
    assert labels["ok"] == "ok"
    for label in labels:
        assert 0 < len(label.encode()) <= 255
        assert "/" not in label and "\n" not in label and label not in (".", "..")
    assert names.tag_labels(["x" * 5000]) == {k: v for k, v in labels.items()
                                              if v == "x" * 5000}  # stable


def test_an_attribute_value_utf8_cannot_hold_is_escaped_not_an_error() -> None:
    """A cloud name with lone surrogates (JSON "\\udcff\\udcfeabc") made getfattr
    fail with EIO and a "bug" log line (str.encode raised)."""
    assert xattr_value("plain é") == "plain é".encode()
    assert xattr_value("\udcff\udcfeabc") == b"\\udcff\\udcfeabc"
    assert xattr_value("\ud800") == b"\\ud800"
