"""The packs this process appends chunks to (chunks.py): lent to one capture at a
time, retired when a capture fails."""

from __future__ import annotations

from .chunkindex import ChunkIndex
from .chunks import PackFiles, PackWriter


class PackPool:
    """This process's packs that still take chunks; each lent to one capture at a time.
    Packs are never shared between processes: each process appends only to packs it
    created, so two daemons on one store cannot interleave writes."""

    def __init__(self, packs: PackFiles, index: ChunkIndex) -> None:
        self.packs = packs
        self.index = index
        self.idle: list[PackWriter] = []
        self.active: set[int] = set()
        #: Packs retired by failed captures: removed once nothing lives in them.
        self.cut: set[int] = set()

    def take(self) -> PackWriter:
        w = self.idle.pop() if self.idle else \
            PackWriter(self.packs, self.index.new_pack(self.packs.floor), 0)
        self.active.add(w.pack)
        return w

    def give_back(self, w: PackWriter) -> None:
        self.active.discard(w.pack)
        if w.full:
            w.close()
        else:
            w.idle()
            self.idle.append(w)

    def retire(self, w: PackWriter) -> None:
        """A failed capture's writer: no chunk goes there again, and its
        uncommitted tail is cut off now (a worker thread's job: it waits for
        the writes in flight)."""
        self.active.discard(w.pack)
        self.cut.add(w.pack)
        w.close(cut=True)

    def ours(self) -> set[int]:
        return self.active | {w.pack for w in self.idle}

    def close(self) -> None:
        for w in self.idle:
            w.close()
        self.idle.clear()
