"""Many processes on one store, driven as users would: two `snapfs mount`s and a
`snapfs serve` of one store; threads create snapshots through each, delete random
ones through each, and read the image.raw of available ones, comparing its sha256
with the volume's; one process can be SIGKILLed mid-run and restarted.

Used by tests/test_mount_procs.py (a timed run) and scripts/bench/concurrency.py
(a fixed count of operations). Nothing is mocked: real processes, real store.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fixtures_http import SECRET, start_server, stop_server
from fixtures_mount import MiB, ZONE, Mount, is_mounted, snapfs

#: Volumes: two with the same bytes (captures in two processes insert the same new
#: chunks at once) and one of its own; 8 MiB each, data with a hole.
VOLUME_SIZE = 8 * MiB


def make_volumes(base: Path, store: Path) -> dict[str, tuple[str, str]]:
    """name -> (volume id, sha256 of its bytes), registered in ``store``."""
    rnd = random.Random(1)
    shared = rnd.randbytes(3 * MiB) + bytes(2 * MiB) + rnd.randbytes(3 * MiB)
    own = rnd.randbytes(2 * MiB) + bytes(4 * MiB) + rnd.randbytes(2 * MiB)
    out = {}
    for name, data in (("twin1", shared), ("twin2", shared), ("solo", own)):
        path = base / f"{name}.raw"
        path.write_bytes(data)
        snapfs("volume", "add", name, path, "--store", store)
        out[name] = ("", hashlib.sha256(data).hexdigest())
    listing = snapfs("volume", "list", "--store", store, "--json").stdout
    for v in json.loads(listing):
        out[v["name"]] = (v["id"], out[v["name"]][1])
    return out


@dataclass
class Stats:
    created: int = 0
    deleted: int = 0
    reads: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # why an operation was refused
    wrong: list[str] = field(default_factory=list)  # reads that returned other bytes
    errors: list[str] = field(default_factory=list)  # failures that must not happen
    #: error_reason of the snapshots seen in state error (a capture cut short by
    #: the SIGKILL is one; anything else is a failure of the test's caller to judge)
    failed: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            if what in ("created", "deleted", "reads"):
                setattr(self, what, getattr(self, what) + 1)
            else:
                self.refused[what] = self.refused.get(what, 0) + 1

    @property
    def operations(self) -> int:
        return self.created + self.deleted + self.reads


class Api:
    """The Instance API of `snapfs serve`, over plain HTTP (a URL that changes
    when the server is restarted)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        host = self.url.removeprefix("http://")
        conn = http.client.HTTPConnection(host, timeout=60)
        try:
            conn.request(method, f"/instance/v1/zones/{ZONE}{path}",
                         body=None if body is None else json.dumps(body),
                         headers={"X-Auth-Token": SECRET, "Content-Type": "application/json"})
            res = conn.getresponse()
            data = res.read()
            return res.status, json.loads(data) if data else None
        finally:
            conn.close()


class Cluster:
    """Two mounts and a server of one store; stop() always leaves nothing running."""

    def __init__(self, base: Path, store: Path) -> None:
        self.base, self.store = base, store
        self.mounts: list[Mount] = []
        self.server: subprocess.Popen[bytes] | None = None
        self.api = Api("")
        self.serve_log = base / "serve.log"

    def start(self) -> None:
        for i in range(2):
            mnt = self.base / f"mnt{i}"
            mnt.mkdir()
            m = Mount(mnt, self.store)
            self.mounts.append(m)
            m.start()
        self.start_server()

    def start_server(self) -> None:
        self.server, self.api.url = start_server(self.store, self.serve_log,
                                                 {"SCW_SECRET_KEY": SECRET})

    def kill_server(self) -> None:
        """SIGKILL, as the OOM killer would: no cleanup of its own."""
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()
        if self.server.stdout is not None:
            self.server.stdout.close()
        self.server = None

    def pids(self) -> list[int]:
        pids = [m.pid for m in self.mounts if m.pid is not None]
        return pids + ([self.server.pid] if self.server is not None else [])

    def stop(self) -> None:
        for m in self.mounts:
            m.stop()
        if self.server is not None:
            code = stop_server(self.server)
            self.server = None
            assert code == 0, f"snapfs serve exited {code} on SIGTERM"
        for m in self.mounts:
            assert not is_mounted(m.path), f"{m.path} is still mounted"

    def logs(self) -> str:
        text = self.serve_log.read_text(errors="replace") if self.serve_log.exists() else ""
        return text + (self.mounts[0].log() if self.mounts else "")


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: errnos a mount may answer in this race, each a refusal the user sees as such:
#: gone meanwhile (ENOENT), open or being made (EBUSY).
EXPECTED_ERRNOS = {errno.ENOENT: "ENOENT", errno.EBUSY: "EBUSY"}


class Stress:
    """The workers; run() returns when ``until()`` says so."""

    def __init__(self, cluster: Cluster, volumes: dict[str, tuple[str, str]],
                 seed: int = 0) -> None:
        self.cluster = cluster
        self.volumes = volumes
        self.stats = Stats()
        self.rnd = random.Random(seed)
        self.serial = iter(range(1_000_000))
        self.names: dict[str, str] = {}  # name -> volume name, of snapshots made
        self.ready: set[str] = set()  # of those, the ones seen no longer snapshotting
        self.names_lock = threading.Lock()
        self.server_down = threading.Event()

    def _new_name(self, who: str) -> str:
        with self.names_lock:
            return f"{who}-{next(self.serial)}"

    def _pick(self, ready: bool = False, strict: bool = False) -> tuple[str, str] | None:
        """A snapshot made; ``ready``: one its creator saw end, when there is one
        (a reader): deletes keep pace with creates, so most names are of captures
        still running, and a reader picking among all of them read too rarely for
        the run to say anything about reads (18 in one CI run). ``strict``: only
        such a one."""
        with self.names_lock:
            pool = sorted(self.ready & self.names.keys()) if ready else []
            if not strict:
                pool = pool or sorted(self.names)
            if pool:
                name = self.rnd.choice(pool)
                return name, self.names[name]
        time.sleep(0.01)  # nothing made yet
        return None

    def _forget(self, name: str) -> None:
        with self.names_lock:
            self.names.pop(name, None)
            self.ready.discard(name)

    def _os_error(self, what: str, exc: OSError) -> None:
        name = EXPECTED_ERRNOS.get(exc.errno or 0)
        if name is None:
            self.stats.errors.append(f"{what}: {exc!r}")
        else:
            self.stats.count(f"{what} {name}")
            time.sleep(0.01)  # refused: a moment before the next try, as a user would

    # --- operations -----------------------------------------------------------------

    def create(self, via: int) -> None:
        """A snapshot, then its end awaited as `snapfs wait` would (a user's pace)."""
        vol = self.rnd.choice(sorted(self.volumes))
        if via < 2:
            name = self._new_name(f"m{via}")
            m = self.cluster.mounts[via]
            try:
                os.mkdir(m.volume(vol) / name)
            except OSError as exc:
                self._os_error("mkdir", exc)
                return
        else:
            name = self._new_name("api")
            status, body = self._api("POST", "/snapshots",
                                     {"name": name, "volume_id": self.volumes[vol][0]})
            if status != 201:
                if status is not None:
                    self.stats.errors.append(f"create via API: {status} {body}")
                return
            sid = body["snapshot"]["id"]
        with self.names_lock:
            self.names[name] = vol
        self.stats.count("created")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if via < 2:
                try:
                    state = self._xattr(via, name, "state")
                except OSError:
                    return  # deleted meanwhile (by another thread)
            else:
                status, body = self._api("GET", f"/snapshots/{sid}")
                if status != 200:
                    return
                state = body["snapshot"]["state"]
            if state != "snapshotting":
                with self.names_lock:
                    if name in self.names:
                        self.ready.add(name)
                return
            time.sleep(0.05)
        self.stats.errors.append(f"{name} still snapshotting after 60 s")

    def _xattr(self, via: int, name: str, attr: str) -> str:
        path = self.cluster.mounts[via].snapshots() / name
        return os.getxattr(path, f"user.{attr}").decode()

    def delete(self, via: int) -> None:
        # Mostly snapshots whose capture was seen to end, sometimes any (a delete
        # racing a capture): a delete of a running capture returns at once, so
        # picking among all, deletes outran every capture and left nothing to read.
        picked = self._pick(ready=True, strict=True) if self.rnd.random() < 0.75 \
            else self._pick()
        if picked is None:
            return
        name, _ = picked
        if via < 2:
            try:
                os.rmdir(self.cluster.mounts[via].snapshots() / name)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    self._forget(name)
                self._os_error("rmdir", exc)
                return
        else:
            sid = self._id_of(name)
            if sid is None:
                return
            status, body = self._api("DELETE", f"/snapshots/{sid}")
            if status == 412:
                self.stats.count("DELETE 412")
                time.sleep(0.01)
                return
            if status == 404:
                self._forget(name)
                self.stats.count("DELETE 404")
                return
            if status != 204:
                if status is not None:
                    self.stats.errors.append(f"delete via API: {status} {body}")
                return
        self._forget(name)
        self.stats.count("deleted")

    def read(self, via: int) -> None:
        picked = self._pick(ready=True)
        if picked is None:
            return
        name, vol = picked
        snap = self.cluster.mounts[via].snapshots() / name
        try:
            state = self._xattr(via, name, "state")
            # Seen done through the other mount or the API, this mount may still
            # show its listing's state for up to its 1 s TTL: a user waits that out
            # (a CI run skipped 10,233 reads so, and read 15 times in 120 s).
            deadline = time.monotonic() + 2
            while state == "snapshotting" and time.monotonic() < deadline:
                time.sleep(0.05)
                state = self._xattr(via, name, "state")
            if state == "error":
                reason = self._xattr(via, name, "error_reason")
                with self.stats.lock:
                    self.stats.failed.add(reason)
            if state != "available":
                self.stats.count(f"read skipped: {state}")
                time.sleep(0.02)  # as a user would before trying again
                return
            h = hashlib.sha256()
            with open(snap / "image.raw", "rb", buffering=0) as f:
                while block := f.read(MiB):
                    h.update(block)
        except OSError as exc:
            self._os_error("read", exc)
            return
        if h.hexdigest() != self.volumes[vol][1]:
            self.stats.wrong.append(f"{name} (of {vol}) read through mount {via}")
        self.stats.count("reads")

    def _id_of(self, name: str) -> str | None:
        status, body = self._api("GET", f"/snapshots?name={name}")
        if status != 200:
            return None
        ids = [s["id"] for s in body["snapshots"] if s["name"] == name]
        if not ids:
            self._forget(name)
            self.stats.count("DELETE: gone")
            return None
        return str(ids[0])

    def _api(self, method: str, path: str, body: Any = None) -> tuple[int | None, Any]:
        """(status, body); (None, None) while the server is down (being restarted)."""
        if self.server_down.is_set():
            return None, None
        try:
            return self.cluster.api.call(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            if self.server_down.is_set():
                return None, None
            self.stats.errors.append(f"{method} {path}: {exc!r}")
            return None, None

    # --- the run --------------------------------------------------------------------

    def run(self, until: Callable[[], bool], kill_when: Callable[[], bool] | None = None
            ) -> float:
        """Workers until ``until()``; the server SIGKILLed and restarted once when
        ``kill_when()`` first holds. Returns the seconds it ran."""
        ops: list[tuple[Callable[[int], None], int]] = [
            (self.create, 0), (self.create, 1), (self.create, 2),
            (self.delete, 0), (self.delete, 1), (self.delete, 2),
            (self.read, 0), (self.read, 1), (self.read, 0), (self.read, 1)]
        failures: list[BaseException] = []

        def worker(op: Callable[[int], None], via: int) -> None:
            try:
                while not until():
                    op(via)
            except BaseException as exc:  # reported by the caller
                failures.append(exc)
        threads = [threading.Thread(target=worker, args=o, daemon=True) for o in ops]
        start = time.monotonic()
        for t in threads:
            t.start()
        killed = False
        while any(t.is_alive() for t in threads):
            if kill_when is not None and not killed and kill_when():
                killed = True
                self.server_down.set()
                self.cluster.kill_server()
                time.sleep(0.5)
                self.cluster.start_server()  # its open recovers the killed one's work
                self.server_down.clear()
            time.sleep(0.05)
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return time.monotonic() - start


    def delete_all(self) -> list[str]:
        """With every worker stopped: delete what is left through the API. Each
        must go (no reader lock outlives its reader); the refusals otherwise."""
        refused = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = self.cluster.api.call("GET", "/snapshots?per_page=100")
            assert status == 200, body
            if not body["snapshots"]:
                return refused
            for snap in body["snapshots"]:
                if snap["state"] == "snapshotting":
                    continue  # awaited by the next round
                status, body = self.cluster.api.call("DELETE", f"/snapshots/{snap['id']}")
                if status not in (204, 404):
                    refused.append(f"{snap['name']}: {status} {body}")
            if refused:
                return refused
            time.sleep(0.05)
        return ["snapshots still there after 60 s"]


def fsck(store: Path) -> subprocess.CompletedProcess[str]:
    return snapfs("fsck", "--store", store, check=False, timeout=300)
