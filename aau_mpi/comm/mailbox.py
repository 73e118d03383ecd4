"""The mailbox: one-sided deposits into neighbours' RMA windows (spec section 2).

Each rank allocates ONE window with `MPI.Win.Allocate` (a window made with
`Win.Create` lost passive progress with Open MPI: a put into a busy target
waited for the target's whole busy period). The window holds one slot per
in-neighbour, or `slots_per_neighbour` slots (dpsgd uses one per round a
neighbour can run ahead, `Graph.rounds_in_flight`; the caller names the
slot). The mailbox knows nothing of policies: it moves bytes and keeps them
consistent.

Window layout (layout version LAYOUT_VERSION, all little-endian):

    offset 0                 header table: one record per slot, HEADER fields
    table_bytes              payload of slot 0 (payload_size float32)
    table_bytes + stride     payload of slot 1 ...

Slot s = (index of the sender in the owner's sorted in-neighbour list)
         * slots_per_neighbour + (the slot the sender names, default
         iteration mod slots_per_neighbour).
The table and each payload start on a 64-byte boundary.

Header record (`aau_mpi.comm.header.header_dtype`):

    version    int64   seqlock word: odd while a deposit is being written
    seq        int64   deposits this sender has made into this slot
    iteration  int64   sender's iteration k at the deposit
    time       float64 the job clock at the deposit (`World.clock`: s since the
                       common start, one time line for all nodes)
    done       int64   1: the sender finished; nothing more will come
    weight     float64 push-sum weight (1.0 unless a policy uses it)
    checksum   int64   crc32 of the payload (Mailbox(checksum=True)), else 0
    epoch      int64   reach epoch (connectivity by reach sets)
    reach      uint64[ceil(world/64)]  bitmap of ranks that reached the sender

Consistency is a seqlock (spec contract 2). The slot has exactly one writer,
so writers never race each other; only the owner's local read races a write.
Each target's slot is locked on its own, so a slot is busy only while its own
copy is written, never while the sender writes its other targets:

    writer, for each target t in turn:
            version <- 2*seq-1 (odd); Flush(t); fields + payload; Flush(t);
            version <- 2*seq (even); Flush(t)
    reader: v1 <- version; copy header and payload; v2 <- version;
            the copy is whole iff v1 == v2 and v1 is even; else retry.

The version word is only ever written and read with accumulate-family calls
(`Fetch_and_op` REPLACE by the writer, `Fetch_and_op` NO_OP by the reader on
its own window), which MPI makes atomic with respect to each other: a plain
load racing an accumulate is undefined by the standard, even where an
aligned 8-byte store happens not to tear. The payload itself is read with
plain loads (that race is what the two version reads detect). The design
needs the unified memory model (`MPI_WIN_UNIFIED`: the window's public and
private copies are one memory, so a completed remote write is visible to
local loads after `Win_sync`); the constructor refuses a separate-model
window with a one-line error.

A copy can only be taken between two deposits into that slot: a sender that
deposits back-to-back with no pause at all starves the reader (`read` gives
up and returns None, `headers` keeps showing the last whole header). Training
computes between deposits, so readers always find such a gap.

With `checksum=True` the writer stores the payload's crc32 in the header and
the reader verifies every copy that the seqlock passed: an end-to-end check
of the consistency argument (used by the soak test), at the cost of one crc32
per deposit and per read (about 1 ms per MB). `stats` counts reads, reads
that gave up, and copies that failed the check (expected: zero).

Synchronisation: one `Lock_all` epoch spans the mailbox's life. It is opened
while all ranks are inside MPI (collective construction) because MPICH only
gives passive progress that way; per-deposit `Lock`/`Unlock` would wait for a
busy target. Inside the epoch `Flush(target)` completes this rank's
operations at that target, which orders the three writer steps.
`MPI_MODE_NOCHECK` is never used: it would switch exclusion off, and the
seqlock needs none. Under ULFM a `StallGuard` (aau_mpi.comm.survivors)
watches each version-word call: a dead rank can leave a window's
accumulate lock held.

Threads: `deposit` may run on a communication thread while the owner's
thread calls `headers` and `read` (see `aau_mpi.comm.depositor`); that needs
`MPI_THREAD_MULTIPLE`. Deposits themselves must come from one thread at a
time.
"""

import time
import zlib
from contextlib import nullcontext

import numpy as np
from mpi4py import MPI

from aau_mpi.base.errors import UserError
from aau_mpi.comm.header import LAYOUT_VERSION, header_dtype

ALIGN = 64


def _aligned(nbytes):
    return -(-nbytes // ALIGN) * ALIGN


class Backoff:
    """Sleep a little longer after each failed attempt, up to a cap.

    Spinning on a slot that a writer is filling only steals the core that the
    writer (often oversubscribed on the same node) needs to finish.
    """

    def __init__(self, first=1e-6, cap=1e-3):
        self.first, self.cap = first, cap
        self.delay = 0.0

    def wait(self):
        self.delay = min(self.cap, max(self.first, 2 * self.delay))
        time.sleep(self.delay)


class Mailbox:
    """One rank's window plus the means to deposit into its out-neighbours'.

    Collective over `comm`: every rank constructs its Mailbox in the same order
    and, at the end, calls `close()`. `in_neighbours` / `out_neighbours` are
    every rank this one may ever read from / deposit into (for a time-varying
    graph, the union over its period); `deposit(..., targets=...)` names the
    ones an iteration uses.
    """

    def __init__(self, comm, in_neighbours, out_neighbours, payload_size,
                 slots_per_neighbour=1, clock=MPI.Wtime, checksum=False, guard=None):
        self.comm = comm
        self.checksum = checksum
        self.stats = {"deposits": 0, "reads": 0, "gave_up": 0, "corrupt": 0}
        self.rank = comm.Get_rank()
        self.in_neighbours = sorted(int(j) for j in in_neighbours)
        self.out_neighbours = sorted(int(j) for j in out_neighbours)
        self._atomic = {t: guard.atomic(t) if guard is not None else nullcontext()
                        for t in {self.rank, *self.out_neighbours}}
        self.payload_size = int(payload_size)
        self.slots_per_neighbour = int(slots_per_neighbour)
        self.clock = clock
        outs = self._check_agreement()
        self.header_dtype = header_dtype(comm.Get_size())
        self.num_slots = len(self.in_neighbours) * self.slots_per_neighbour
        self.table_bytes = self._table_bytes(len(self.in_neighbours))
        self.payload_stride = _aligned(4 * self.payload_size)

        # Where this rank's slots start in each out-neighbour's window: the
        # target's table size depends on the target's in-degree, not ours.
        senders = {t: sorted(j for j, out in enumerate(outs) if t in out)
                   for t in self.out_neighbours}
        self._first_slot = {t: senders[t].index(self.rank) * self.slots_per_neighbour
                            for t in self.out_neighbours}
        self._target_table_bytes = {t: self._table_bytes(len(senders[t]))
                                    for t in self.out_neighbours}
        self._sent = {t: np.zeros(self.slots_per_neighbour, np.int64)
                      for t in self.out_neighbours}
        # Origin buffers: MPI forbids changing one before the Flush that
        # completes its operation, so each target has its own.
        self._record = np.zeros(1, dtype=self.header_dtype)
        self._version = np.zeros(1, np.int64)
        self._fetched = np.zeros(1, np.int64)
        self._no_op = np.zeros(max(1, self.num_slots), np.int64)
        self._versions_read = np.zeros(max(1, self.num_slots), np.int64)

        window_bytes = self.table_bytes + self.num_slots * self.payload_stride
        self.win = MPI.Win.Allocate(window_bytes, disp_unit=1, comm=comm)
        self._check_memory_model()
        memory = np.frombuffer(self.win.tomemory(), dtype=np.uint8)
        self._table = np.ndarray(self.num_slots, dtype=self.header_dtype, buffer=memory)
        self._payloads = [np.ndarray(self.payload_size, dtype=np.float32, buffer=memory,
                                     offset=self.table_bytes + s * self.payload_stride)
                          for s in range(self.num_slots)]
        self._table[:] = np.zeros((), dtype=self.header_dtype)
        self._last_consistent = self._table.copy()
        # Every window is zeroed before anyone may write; the epoch is opened
        # while all ranks are inside MPI (see module docstring).
        comm.Barrier()
        self.win.Lock_all()
        comm.Barrier()
        self.closed = False

    def _table_bytes(self, in_degree):
        return _aligned(in_degree * self.slots_per_neighbour * header_dtype(
            self.comm.Get_size()).itemsize)

    def _verdict(self, problem):
        """Collective: every rank raises the first rank's problem, or none raises
        (a rank that went on alone would wait in the next collective for ever)."""
        problems = [p for p in self.comm.allgather(problem) if p]
        if problems:
            raise UserError(problem or problems[0])

    def _check_agreement(self):
        """All ranks must agree on the graph, the payload size and the layout.

        One allgather of (layout, payload size, out-neighbours): O(N x degree)
        numbers. Returns every rank's out-neighbour list.
        """
        mine = (LAYOUT_VERSION, self.payload_size, self.out_neighbours)
        everyone = self.comm.allgather(mine)
        layouts = sorted({layout for layout, _, _ in everyone})
        sizes = [size for _, size, _ in everyone]
        outs = [out for _, _, out in everyone]
        problem = None
        if len(layouts) > 1:
            problem = (f"ranks use different mailbox layouts (versions {layouts}): "
                       f"install the same aau_mpi version on every node")
        elif min(sizes) != max(sizes) or min(sizes) < 1:
            problem = (f"mailbox payload sizes differ between ranks or are empty "
                       f"({min(sizes)}..{max(sizes)} floats): every rank must build "
                       f"the same model")
        senders = sorted(j for j, out in enumerate(outs) if self.rank in out)
        if problem is None and (senders != self.in_neighbours or self.rank in senders):
            problem = (f"rank {self.rank} expects deposits from {self.in_neighbours} "
                       f"but ranks {senders} deposit into it: every rank must load "
                       f"the same topology, without self-loops")
        self._verdict(problem)
        return outs

    def _check_memory_model(self):
        model = self.win.Get_attr(MPI.WIN_MODEL)
        problem = None
        if model != MPI.WIN_UNIFIED:
            problem = (f"rank {self.rank}'s MPI gives RMA windows the separate memory model, "
                       f"the mailbox needs MPI_WIN_UNIFIED: use an MPI whose windows are "
                       f"unified on this hardware (Open MPI 5 or MPICH 4+ on a cache-coherent "
                       f"machine), see docs/mailbox.md")
        try:
            self._verdict(problem)
        except UserError:
            self.win.Free()
            raise

    # ---- writer side ------------------------------------------------------

    def deposit(self, payload, iteration, done=False, weight=1.0, epoch=0, reach=None,
                slot=None, targets=None):
        """Put `payload` (float32, payload_size) into `targets`' slots (default: every
        out-neighbour), slot `slot` of this sender (default iteration mod slots).

        Returns once the data is complete at every target; never waits for a
        target to make an MPI call (passive progress, spec contract 1).
        """
        payload = np.ascontiguousarray(payload, dtype=np.float32)
        if payload.size != self.payload_size:
            raise ValueError(f"payload has {payload.size} floats, mailbox expects "
                             f"{self.payload_size}")
        targets = self.out_neighbours if targets is None else targets
        if not targets:  # a single rank, or no target this iteration
            return
        slot = int(iteration) % self.slots_per_neighbour if slot is None else int(slot)
        record = self._record[0]
        record["iteration"] = iteration
        record["time"] = self.clock()
        record["done"] = int(done)
        record["weight"] = weight
        record["checksum"] = zlib.crc32(payload) if self.checksum else 0
        record["epoch"] = epoch
        record["reach"] = 0 if reach is None else reach
        self.stats["deposits"] += 1
        for target in targets:
            self._sent[target][slot] += 1
            record["seq"] = self._sent[target][slot]
            self._deposit_one(target, self._first_slot[target] + slot, payload)

    def _deposit_one(self, target, slot, payload):
        """The seqlock on one target's slot: odd, contents, even, each completed
        at the target (Flush) before the next starts."""
        seq = int(self._record[0]["seq"])
        self._set_version(target, slot, 2 * seq - 1)
        fields = self._record.view(np.uint8)[8:]  # every field after `version`
        self.win.Put([fields, fields.size, MPI.BYTE], target,
                     target=(slot * self.header_dtype.itemsize + 8, fields.size, MPI.BYTE))
        self.win.Put([payload, self.payload_size, MPI.FLOAT], target,
                     target=(self._target_table_bytes[target] + slot * self.payload_stride,
                             self.payload_size, MPI.FLOAT))
        self.win.Flush(target)
        self._set_version(target, slot, 2 * seq)

    def _set_version(self, target, slot, version):
        """Write the slot's version word atomically (Fetch_and_op REPLACE; the
        fetched old value is unused: plain Accumulate leaked 128 bytes per call
        in MPICH's wheel, this does not), complete at the target before return."""
        self._version[0] = version
        with self._atomic[target]:
            self.win.Fetch_and_op([self._version, 1, MPI.INT64_T],
                                  [self._fetched, 1, MPI.INT64_T], target,
                                  slot * self.header_dtype.itemsize, op=MPI.REPLACE)
            self.win.Flush(target)

    # ---- reader side (own window: no remote traffic) ------------------------

    def _read_versions(self, slots):
        """The version words of own `slots`, each read atomically (Fetch_and_op
        NO_OP on this rank's own window, all completed by one Flush)."""
        with self._atomic[self.rank]:
            for n, s in enumerate(slots):
                self.win.Fetch_and_op([self._no_op[n:n + 1], 1, MPI.INT64_T],
                                      [self._versions_read[n:n + 1], 1, MPI.INT64_T],
                                      self.rank, s * self.header_dtype.itemsize, op=MPI.NO_OP)
            self.win.Flush(self.rank)
        return self._versions_read[:len(slots)].copy()

    def versions(self):
        """Every own slot's version word (atomic reads, no copy): a cheap test of
        whether anything was deposited since the last look."""
        return self._read_versions(range(self.num_slots)) if self.num_slots else \
            self._versions_read[:0].copy()

    def headers(self):
        """Snapshot of all own slots' headers, shape (in-degree, slots per neighbour).

        No payload is copied. A slot being written at this moment shows its
        last whole header instead (never a half-written one).
        """
        if self.num_slots:
            slots = range(self.num_slots)
            before = self._read_versions(slots)
            # Win_sync: the memory barrier between RMA writes and local loads.
            self.win.Sync()
            table = self._table.copy()
            self.win.Sync()
            whole = (before == self._read_versions(slots)) & (before % 2 == 0)
            self._last_consistent[whole] = table[whole]
        return self._last_consistent.reshape(len(self.in_neighbours),
                                             self.slots_per_neighbour).copy()

    def read(self, neighbour_index, slot=0, out=None, attempts=100):
        """Copy one slot's payload consistently.

        `out`: a float32 array to copy into (default: a new one), or a callable
        `out(source)` that copies the window's payload view `source` where the
        caller wants it (e.g. straight to a GPU) and returns the destination.
        Returns (header record, destination), or None when every attempt
        overlapped a write, or the copy failed its checksum (the caller then
        treats the slot as not fresh).
        """
        s = neighbour_index * self.slots_per_neighbour + slot
        if out is None:
            out = np.empty(self.payload_size, np.float32)
        copy = out if callable(out) else (lambda source: np.copyto(out, source) or out)
        backoff = Backoff()
        for _ in range(attempts):
            before = int(self._read_versions([s])[0])
            if before % 2 == 0:
                self.win.Sync()
                record = self._table[s].copy()
                # The checksum is of the window's bytes, inside the same version
                # window as the copy, so it holds for whatever `copy` makes of them.
                crc = zlib.crc32(self._payloads[s]) if self.checksum else 0
                destination = copy(self._payloads[s])
                self.win.Sync()
                if int(self._read_versions([s])[0]) == before:
                    # seq 0: nothing deposited yet, no checksum to verify.
                    if self.checksum and record["seq"] > 0 and crc != record["checksum"]:
                        self.stats["corrupt"] += 1
                        return None
                    self.stats["reads"] += 1
                    return record, destination
            backoff.wait()
        self.stats["gave_up"] += 1
        return None

    # ---- end --------------------------------------------------------------

    def close(self):
        """Collective: end the epoch and free the window.

        Safe when ranks finish at different times: a rank that closes early
        waits in Win.Free (still inside MPI, so deposits into it complete)
        until every rank has closed.
        """
        if self.closed:
            return
        self.closed = True
        self._table = self._payloads = None  # views into memory about to be freed
        self.win.Unlock_all()
        self.win.Free()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # After an error on this rank, a collective Free could wait for ranks
        # that will never reach it; the error handler aborts the job instead.
        if exc_type is None:
            self.close()

