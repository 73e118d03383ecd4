"""The mailbox: one-sided deposits into neighbours' RMA windows (spec section 2).

Each rank allocates ONE window with `MPI.Win.Allocate` (a window made with
`Win.Create` lost passive progress with Open MPI: a put into a busy target
waited for the target's whole busy period). The window holds one slot per
in-neighbour, or `slots_per_neighbour` slots (dpsgd uses two, indexed by the
parity of the sender's iteration). The mailbox knows nothing of policies: it
moves bytes and keeps them consistent.

Window layout (layout version LAYOUT_VERSION, all little-endian):

    offset 0                 header table: one record per slot, HEADER fields
    table_bytes              payload of slot 0 (payload_size float32)
    table_bytes + stride     payload of slot 1 ...

Slot s = (index of the sender in the owner's sorted in-neighbour list)
         * slots_per_neighbour + (iteration mod slots_per_neighbour).
The table and each payload start on a 64-byte boundary.

Header record (`aau_mpi.header.header_dtype`):

    version    int64   seqlock word: odd while a deposit is being written
    seq        int64   deposits this sender has made into this slot
    iteration  int64   sender's iteration k at the deposit
    time       float64 sender's clock at the deposit (s since the job start)
    done       int64   1: the sender finished; nothing more will come
    weight     float64 push-sum weight (1.0 unless a policy uses it)
    checksum   int64   crc32 of the payload (Mailbox(checksum=True)), else 0
    epoch      int64   reach epoch (connectivity by reach sets)
    reach      uint64[ceil(world/64)]  bitmap of ranks that reached the sender

Consistency is a seqlock (spec contract 2). The slot has exactly one writer,
so writers never race each other; only the owner's local read races a write:

    writer: version <- 2*seq-1 (odd); flush; fields + payload; flush;
            version <- 2*seq (even); flush
    reader: v1 <- version; copy header and payload; v2 <- version;
            the copy is whole iff v1 == v2 and v1 is even; else retry.

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
busy target. Inside the epoch a `Flush` completes a rank's operations at the
target, which orders the three writer steps. `MPI_MODE_NOCHECK` is never used:
it would switch exclusion off, and the seqlock needs none.
"""

import time
import zlib

import numpy as np
from mpi4py import MPI

from aau_mpi.errors import UserError
from aau_mpi.header import LAYOUT_VERSION, header_dtype

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
    and, at the end, calls `close()`.
    """

    def __init__(self, comm, in_neighbours, out_neighbours, payload_size,
                 slots_per_neighbour=1, clock=MPI.Wtime, checksum=False):
        self.comm = comm
        self.checksum = checksum
        self.stats = {"deposits": 0, "reads": 0, "gave_up": 0, "corrupt": 0}
        self.rank = comm.Get_rank()
        self.in_neighbours = sorted(int(j) for j in in_neighbours)
        self.out_neighbours = sorted(int(j) for j in out_neighbours)
        self.payload_size = int(payload_size)
        self.slots_per_neighbour = int(slots_per_neighbour)
        self.clock = clock
        self._check_agreement()
        self.header_dtype = header_dtype(comm.Get_size())
        self.num_slots = len(self.in_neighbours) * self.slots_per_neighbour
        self.table_bytes = _aligned(self.num_slots * self.header_dtype.itemsize)
        self.payload_stride = _aligned(4 * self.payload_size)

        # Where this rank's slots start in each out-neighbour's window: the
        # target's table size depends on the target's in-degree, not ours.
        in_lists = comm.allgather(self.in_neighbours)
        table_sizes = comm.allgather(self.table_bytes)
        self._first_slot = {t: in_lists[t].index(self.rank) * self.slots_per_neighbour
                            for t in self.out_neighbours}
        self._target_table_bytes = {t: table_sizes[t] for t in self.out_neighbours}
        self._sent = {t: np.zeros(self.slots_per_neighbour, np.int64)
                      for t in self.out_neighbours}
        # Origin buffers of the header puts: one record per target, untouched
        # until the Flush that completes the put (MPI forbids changing an
        # origin buffer before its operation completes).
        self._outgoing = np.zeros(len(self.out_neighbours), dtype=self.header_dtype)
        self._version = np.zeros((len(self.out_neighbours), 1), np.int64)
        self._fetched = np.zeros_like(self._version)

        window_bytes = self.table_bytes + self.num_slots * self.payload_stride
        self.win = MPI.Win.Allocate(window_bytes, disp_unit=1, comm=comm)
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

    def _check_agreement(self):
        """All ranks must agree on the graph and the payload size.

        The verdict is collective (every rank raises, or none does): a rank
        that went on alone into Win.Allocate would wait there for ever.
        """
        sizes = self.comm.allgather(self.payload_size)
        outs = self.comm.allgather(self.out_neighbours)
        layouts = self.comm.allgather(LAYOUT_VERSION)
        problem = None
        if min(layouts) != max(layouts):
            problem = (f"ranks use different mailbox layouts (versions {sorted(set(layouts))}): "
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
        problems = [p for p in self.comm.allgather(problem) if p]
        if problems:
            raise UserError(problem or problems[0])

    # ---- writer side ------------------------------------------------------

    def deposit(self, payload, iteration, done=False, weight=1.0, epoch=0, reach=None):
        """Put `payload` (float32, payload_size) into every out-neighbour's slot.

        Returns once the data is complete at every target; never waits for a
        target to make an MPI call (passive progress, spec contract 1).
        """
        payload = np.ascontiguousarray(payload, dtype=np.float32)
        if payload.size != self.payload_size:
            raise ValueError(f"payload has {payload.size} floats, mailbox expects "
                             f"{self.payload_size}")
        if not self.out_neighbours:  # a single rank: nobody to deposit into
            return
        parity = int(iteration) % self.slots_per_neighbour
        now = self.clock()
        crc = zlib.crc32(payload) if self.checksum else 0
        self.stats["deposits"] += 1
        for n, target in enumerate(self.out_neighbours):
            self._sent[target][parity] += 1
            record = self._outgoing[n]
            record["seq"] = self._sent[target][parity]
            record["iteration"] = iteration
            record["time"] = now
            record["done"] = int(done)
            record["weight"] = weight
            record["checksum"] = crc
            record["epoch"] = epoch
            record["reach"] = 0 if reach is None else reach
        slots = [self._first_slot[t] + parity for t in self.out_neighbours]
        self._set_versions(slots, odd=True)
        self._put_contents(slots, payload)
        self._set_versions(slots, odd=False)

    def _set_versions(self, slots, odd):
        """Seqlock step: mark each target slot busy (odd) or whole (even).

        Fetch_and_op(REPLACE), an accumulate-family call, makes the 8-byte
        write element-wise atomic, so a concurrent reader sees the old or the
        new version word, never a mix (the fetched old value is unused; plain
        Accumulate leaked 128 bytes per call in MPICH 4's wheel, this does
        not). Flush_all completes the writes before the next step starts.
        """
        for n, (target, slot) in enumerate(zip(self.out_neighbours, slots)):
            seq = self._outgoing[n]["seq"]
            self._version[n, 0] = 2 * seq - 1 if odd else 2 * seq
            self.win.Fetch_and_op([self._version[n], 1, MPI.INT64_T],
                                  [self._fetched[n], 1, MPI.INT64_T], target,
                                  slot * self.header_dtype.itemsize, op=MPI.REPLACE)
        self.win.Flush_all()

    def _put_contents(self, slots, payload):
        """Seqlock step: header fields (all but `version`) and the payload."""
        field_bytes = self._outgoing.view(np.uint8).reshape(len(self.out_neighbours), -1)
        for n, (target, slot) in enumerate(zip(self.out_neighbours, slots)):
            fields = field_bytes[n, 8:]
            self.win.Put([fields, fields.size, MPI.BYTE], target,
                         target=(slot * self.header_dtype.itemsize + 8, fields.size, MPI.BYTE))
            self.win.Put([payload, self.payload_size, MPI.FLOAT], target,
                         target=(self._target_table_bytes[target] + slot * self.payload_stride,
                                 self.payload_size, MPI.FLOAT))
        self.win.Flush_all()

    # ---- reader side (own window, local memory, no remote traffic) ---------

    def headers(self):
        """Snapshot of all own slots' headers, shape (in-degree, slots per neighbour).

        No payload is copied. A slot being written at this moment shows its
        last whole header instead (never a half-written one).
        """
        # Win_sync is the memory barrier between RMA writes and local loads.
        self.win.Sync()
        before = self._table["version"].copy()
        self.win.Sync()
        table = self._table.copy()
        self.win.Sync()
        whole = (before == self._table["version"]) & (before % 2 == 0)
        self._last_consistent[whole] = table[whole]
        return self._last_consistent.reshape(len(self.in_neighbours),
                                             self.slots_per_neighbour).copy()

    def read(self, neighbour_index, slot=0, out=None, attempts=100):
        """Copy one slot's payload consistently into `out`.

        Returns (header record, out), or None when every attempt overlapped a
        write, or the copy failed its checksum (the caller then treats the
        slot as not fresh).
        """
        s = neighbour_index * self.slots_per_neighbour + slot
        if out is None:
            out = np.empty(self.payload_size, np.float32)
        backoff = Backoff()
        for _ in range(attempts):
            self.win.Sync()
            before = int(self._table["version"][s])
            if before % 2 == 0:
                self.win.Sync()
                record = self._table[s].copy()
                np.copyto(out, self._payloads[s])
                self.win.Sync()
                if int(self._table["version"][s]) == before:
                    # seq 0: nothing deposited yet, no checksum to verify.
                    if (self.checksum and record["seq"] > 0
                            and zlib.crc32(out) != record["checksum"]):
                        self.stats["corrupt"] += 1
                        return None
                    self.stats["reads"] += 1
                    return record, out
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
