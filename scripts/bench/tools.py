#!/usr/bin/env python3
"""Backup tools reading a snapshot: each tool through snapfs's default mount (and
its two read modes), side by side with the Python-FUSE ceiling
(../shared/bench/passthrough_ceiling.py) in both of its modes on the same bytes.

    .venv/bin/python scripts/bench/tools.py [--size-mib 2048] [--tools dd4k,cat,...]
        [--repeat N]

The volume is a real ext4 image (mkfs.ext4 -d) of mixed files (text, small and
large random files) filling about half of it, plus random data in the rest of the
device. For every tool and every source, a fresh mount: the first read (every
byte through the daemon) then the same read again. Reported: seconds, and snapfs's
default against the better of the ceiling's two modes (target >= 0.8 for every
tool, first read and re-read); the daemon's peak RSS (target <= 200 MB). Prints
os.getloadavg() beside the figures: the machine is shared. What the tools write
(cp's copy, qemu-img's output, the restic and borg repositories) goes to a tmpfs
(``--out-dir``, default /dev/shm): written to the disk (ext4 with online discard
here) the same qemu-img first read took 0.5-8.2 s, to a tmpfs 0.5-1.9 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
#: ../shared/bench beside the main checkout (a worktree sits one level deeper).
CEILING = next((p / "shared" / "bench" / "passthrough_ceiling.py" for p in ROOT.parents
                if (p / "shared" / "bench" / "passthrough_ceiling.py").exists()),
               ROOT.parent / "shared" / "bench" / "passthrough_ceiling.py")
MiB = 1 << 20

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pagecache import add_reclaim_option, reclaim_paused  # noqa: E402
from readahead import parse_variant, tune  # noqa: E402
import verdict  # noqa: E402


#: snapfs's default against the better ceiling mode, for every tool (issue 17).
TARGET = 0.8


def mark(ratio: float) -> str:
    return verdict.mark(ratio, TARGET)


def sh(*cmd: object, env: dict[str, str] | None = None) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}).stdout


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def unmount(path: Path) -> None:
    for _ in range(50):
        if not mounted(path):
            return
        subprocess.run(["umount", str(path)], capture_output=True)
        if mounted(path):
            subprocess.run(["fusermount3", "-u", str(path)], capture_output=True)
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def make_volume(work: Path, size_mib: int) -> Path:
    """An ext4 image: mixed files over about half, random data at the device's end."""
    src = work / "files"
    src.mkdir()
    budget = size_mib * MiB // 2
    used, i = 0, 0
    while used < budget:
        kind = i % 10
        n = (4 << 10) * (1 + i % 7) if kind < 7 else 8 * MiB if kind < 9 else 32 * MiB
        d = src / f"d{i % 16}"
        d.mkdir(exist_ok=True)
        data = (b"line of text %d\n" % i) * (n // 16) if kind < 3 else os.urandom(n)
        (d / f"f{i}").write_bytes(data[:n])
        used += n
        i += 1
    img = work / "volume.raw"
    with open(img, "wb") as f:
        f.truncate(size_mib * MiB)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", src,
       img)
    # Random data in the last eighth (blocks ext4 left free): a device's old bytes.
    with open(img, "r+b") as f:
        f.seek(size_mib * MiB * 7 // 8)
        for _ in range(size_mib // 8):
            f.write(os.urandom(MiB))
    shutil.rmtree(src)
    return img


def tool_commands(work: Path, outputs: Path) -> dict[str, Callable[[Path], str]]:
    """``outputs``: where the tools write (copies, repositories)."""
    out = outputs / "out"
    loopmnt = work / "loopmnt"
    loopmnt.mkdir(exist_ok=True)
    repo = outputs / "restic"
    borg = outputs / "borg"
    return {
        "dd bs=4k": lambda p: f"dd if={p} of=/dev/null bs=4k status=none",
        "dd bs=64k": lambda p: f"dd if={p} of=/dev/null bs=64k status=none",
        "dd bs=1M": lambda p: f"dd if={p} of=/dev/null bs=1M status=none",
        "cat": lambda p: f"cat {p} > /dev/null",
        "tar|cat": lambda p: f"tar -C {p.parent} -cf - {p.name} | cat > /dev/null",
        "sha256sum": lambda p: f"sha256sum {p} > /dev/null",
        "cp": lambda p: f"cp {p} {out} && rm -f {out}",
        "rsync": lambda p: f"rsync --inplace {p} {out} && rm -f {out}",
        "restic": lambda p: (f"RESTIC_PASSWORD=x restic -r {repo} backup --force -q "
                             f"--no-cache {p} > /dev/null"),
        # --files-cache=disabled: borg reads the file every time, as restic --force.
        "borg": lambda p: (f"BORG_REPO={borg} borg create --files-cache=disabled "
                           f"::{{uuid4}} {p}"),
        "qemu-img": lambda p: f"qemu-img convert -f raw -O qcow2 {p} {out} && rm -f {out}",
        "loop+tar": lambda p: (f"dev=$(losetup -r -f --show {p}) && mount -o ro,noload $dev "
                               f"{loopmnt} && tar -C {loopmnt} -cf - . | cat > /dev/null; "
                               f"umount {loopmnt}; losetup -d $dev"),
        # The loop device reading its file with O_DIRECT: no second page cache.
        "loop-dio": lambda p: (f"dev=$(losetup -r --direct-io=on -f --show {p}) && mount -o "
                               f"ro,noload $dev {loopmnt} && tar -C {loopmnt} -cf - . | cat "
                               f"> /dev/null; umount {loopmnt}; losetup -d $dev"),
    }


def timed(cmd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True)
    return time.perf_counter() - t0


def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


class Source:
    """One way to serve the image: a snapfs mount (mode args) or the ceiling."""

    def __init__(self, name: str, work: Path, store: Path, vol: Path,
                 args: list[str] | None = None, ceiling: list[str] | None = None,
                 kernel: dict[str, int] | None = None) -> None:
        self.kernel = kernel  # the mount's kernel read-ahead / FUSE queue (readahead.py)
        self.name, self.store, self.vol, self.args, self.ceiling = (name, store, vol, args,
                                                                    ceiling)
        self.mnt = work / f"mnt-{len(name)}-{abs(hash(name)) % 10000}"
        self.mnt.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss = 0.0

    def start(self) -> Path:
        if self.ceiling is None:
            assert self.args is not None
            sh(sys.executable, "-m", "snapfs", "mount", self.mnt, "--store", self.store,
               *self.args)
            if self.kernel:
                tune(self.mnt, self.kernel)
            return (self.mnt / "fr-par-1" / "default" / "volumes" / "bench" / "snap" /
                    "image.raw")
        self.proc = subprocess.Popen([sys.executable, str(CEILING), str(self.mnt),
                                      str(self.vol), *self.ceiling])
        deadline = time.monotonic() + 30
        while not mounted(self.mnt):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the ceiling did not mount")
            time.sleep(0.05)
        return self.mnt / "image.raw"

    def stop(self) -> None:
        if self.ceiling is None and mounted(self.mnt):
            pid = int(os.getxattr(self.mnt, "user.pid"))
            self.rss = max(self.rss, peak_rss_mb(pid))
        unmount(self.mnt)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--tools", default="", help="comma-separated subset of the tools")
    ap.add_argument("--modes", default="default,--direct-io,--page-cache",
                    help="snapfs mount modes to measure ('default' = no argument)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds per tool (sources interleaved in each); each cell is "
                         "the median: one round's cell moves by up to 5x on 2 shared cores")
    ap.add_argument("--out-dir", type=Path, default=Path("/dev/shm"),
                    help="where the tools' copies and repositories go (default: a tmpfs; "
                         "on the disk, write stalls decided the first reads)")
    ap.add_argument("--kernel", action="append", default=[], metavar="ra=KB,bg=N,cong=N",
                    help="also the default mode with this kernel read-ahead / FUSE queue "
                         "(A/B against the daemon's setting; readahead.py)")
    add_reclaim_option(ap)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="snapfs-tools-", dir=args.dir))
    outputs = Path(tempfile.mkdtemp(prefix="snapfs-tools-out-", dir=args.out_dir))
    sources: list[Source] = []
    try:
        vol = make_volume(work, args.size_mib)
        store = work / "store"
        sh(sys.executable, "-m", "snapfs", "volume", "add", "bench", vol, "--store", store)
        setup = work / "setup"
        setup.mkdir()
        sh(sys.executable, "-m", "snapfs", "mount", setup, "--store", store)
        snapdir = setup / "fr-par-1" / "default" / "volumes" / "bench" / "snap"
        snapdir.mkdir()
        sh(sys.executable, "-m", "snapfs", "wait", snapdir)
        unmount(setup)
        time.sleep(1)
        tools = tool_commands(work, outputs)
        missing = [t for t in ("rsync", "restic", "borg", "qemu-img")
                   if shutil.which(t) is None]
        if missing:
            print(f"not installed, not measured: {', '.join(missing)}")
            tools = {k: v for k, v in tools.items() if k not in missing}
        if args.tools:
            tools = {k: v for k, v in tools.items() if k in args.tools.split(",")}
        if "restic" in tools:
            sh("restic", "-r", outputs / "restic", "init", env={"RESTIC_PASSWORD": "x"})
        if "borg" in tools:
            sh("borg", "init", "-e", "none", outputs / "borg")
        # The repositories primed with the same bytes (the volume file, untimed): else
        # the first source of each round -- always snapfs -- stores every chunk and the
        # others only deduplicate (restic's first run took 6.7-6.9 s, later ones 4 s).
        for name in ("restic", "borg"):
            if name in tools:
                timed(tools[name](vol))
        for mode in args.modes.split(","):
            sources.append(Source(f"snapfs {mode}", work, store, vol,
                                  args=[] if mode == "default" else [mode]))
        for spec in args.kernel:
            sources.append(Source(f"snapfs {spec}", work, store, vol, args=[],
                                  kernel=parse_variant(spec)))
        sources.append(Source("ceiling direct", work, store, vol, ceiling=[]))
        sources.append(Source("ceiling page", work, store, vol, ceiling=["--page-cache"]))

        rounds: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for tool, cmd in tools.items():
            for rep in range(args.repeat):
                for src in sources:  # interleaved: all see the same machine load
                    path = src.start()
                    try:
                        timed(f"cat {path} > /dev/null")  # backing bytes warm (packs / file)
                        src.stop()
                        path = src.start()  # a fresh mount: the FUSE file's cache is empty
                        first = timed(cmd(path))
                        again = timed(cmd(path))
                    finally:
                        src.stop()
                    rounds.setdefault((tool, src.name), []).append((first, again))
                    print(f"{tool:<10} {src.name:<20} first {first:7.2f}s  again "
                          f"{again:7.2f}s  load {os.getloadavg()[0]:.1f}"
                          + (f"  (round {rep})" if args.repeat > 1 else ""), flush=True)
        # Each cell: the median of its rounds (first reads and re-reads apart).
        results = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                   for k, v in rounds.items()}
        size = args.size_mib * MiB
        print(f"\n{args.size_mib} MiB image; load average {os.getloadavg()}"
              + (f"; medians of {args.repeat} rounds" if args.repeat > 1 else ""))
        head = "".join(f"{s.name:>22}" for s in sources)
        print(f"{'tool':<10}{head}   default/best-ceiling first, again")
        for tool in tools:
            row = "".join(f"{size / results[(tool, s.name)][0] / 1e6:>10.0f}/"
                          f"{size / results[(tool, s.name)][1] / 1e6:<11.0f}" for s in sources)
            best = [min(results[(tool, c)][i] for c in ("ceiling direct", "ceiling page"))
                    for i in (0, 1)]
            dflt = results[(tool, sources[0].name)]
            print(f"{tool:<10}{row}   {mark(best[0] / dflt[0])}, {mark(best[1] / dflt[1])}")
            for spec in args.kernel:
                k = results[(tool, f"snapfs {spec}")]
                print(f"{'':<10}{spec}: {mark(best[0] / k[0])}, {mark(best[1] / k[1])}")
        print(f"(MB/s first/again; ratios >= {TARGET} meet the target, '!' marks a miss)")
        print(f"daemon peak RSS: {max(s.rss for s in sources):.0f} MB (target <= 200)")
    finally:
        for s in sources:
            s.stop()
        unmount(work / "setup")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(outputs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with reclaim_paused("--leave-reclaim" not in sys.argv):
        sys.exit(main())
