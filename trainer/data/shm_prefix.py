"""Claim streaming's shared-memory prefix atomically: jobs that start together on one host never collide.

Every `StreamingDataset` names its shared memory `<prefix>_locals`, `<prefix>_barrier`, ... in /dev/shm,
`<prefix>` a six-digit number. Streaming 0.13 (`streaming.base.shared.prefix.get_shm_prefix`) has
every rank scan /dev/shm for the lowest free number, then the node's local leader creates
`<number>_locals` exclusively. Two problems follow when several jobs share a node:

- two leaders scanning at the same instant pick the same number, and the second to create it dies
  with `FileExistsError: ... '/000003_locals'`;
- each non-leader rank scans on its own, so when another job registers a number between its scan
  and its leader's, it looks for its group under another number than its leader's; with the same
  dataset (same local folders) streaming's own check passes and it joins the other job's group.

`claim_shm_prefix` replaces that function while a `MappedDataset` is built (`streaming_claims_prefix`):
the local leader alone scans (streaming's `_check_and_find`; a remote cache folder that a live
loader uses is a UserError), creates `locals` exclusively, and on `FileExistsError` (another process took that number
between scan and create) waits a short random time and scans again, a bounded number of times. The
other ranks of the node learn the number from their leader through torch.distributed and check it as
streaming does (without a process group there is nobody to ask, and a non-leader scans as streaming
does). A failure of the leader reaches every rank of the job, so none waits for it forever.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from tempfile import gettempdir

import streaming.base.dataset as streaming_dataset
import torch.distributed as dist
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN, TICK
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import (
    _check_self,
    _get_path,
    _pack_locals,
    _unpack_locals,
)
from streaming.base.world import World

from trainer.errors import UserError

CLAIM_ATTEMPTS = 20
"""Scans and exclusive creates before giving up: each lost race means another group was registered."""
_MAX_WAIT_S = 0.05
"""Upper bound of the random wait after a lost race, times the attempt number."""
_STREAMING_GET_SHM_PREFIX = streaming_dataset.get_shm_prefix
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory


class PrefixClaimError(RuntimeError):
    """The local leader could not register a shared-memory group."""


Outcome = int | tuple[str, str]
"""What a local leader tells its node: the group number, or ("user" | "error", message)."""


def claim_shm_prefix(
    streams_local: list[str], streams_remote: list[str | None], world: World, retry: int = 100
) -> tuple[int, SharedMemory]:
    """`get_shm_prefix` of streaming 0.13, race-free between jobs; same arguments and result."""
    _check_self(streams_local)
    coordinated = dist.is_available() and dist.is_initialized()
    if not world.is_local_leader and not coordinated:  # nobody to learn the number from: streaming's way
        return _STREAMING_GET_SHM_PREFIX(streams_local, streams_remote, world, retry)
    claimed: tuple[int, SharedMemory] | None = None
    mine: Outcome = -1
    if world.is_local_leader:
        try:
            claimed = _claim_as_leader(streams_local, streams_remote, retry)
            mine = claimed[0]
        except UserError as error:
            mine = ("user", str(error))
        except (PrefixClaimError, OSError) as error:
            mine = ("error", f"the data loader's shared memory could not be set up: {error}")
    outcome = _leaders_outcome(mine, world)
    if isinstance(outcome, tuple):
        kind, message = outcome
        raise UserError(message) if kind == "user" else PrefixClaimError(message)
    if claimed is not None:
        return claimed
    return outcome, _attach_as_follower(streams_local, outcome)


def _claim_as_leader(
    streams_local: list[str], streams_remote: list[str | None], retry: int
) -> tuple[int, SharedMemory]:
    """Scan for the lowest free number and create its `locals` exclusively; scan again after a lost race."""
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        prefix_int = _lowest_free_number(streams_local, streams_remote, retry)
        data = _pack_locals(streams_local, prefix_int)
        try:
            shm = SharedMemory(_get_path(prefix_int, LOCALS), True, len(data))
        except FileExistsError:
            time.sleep(random.uniform(0, _MAX_WAIT_S * attempt))
            continue
        shm.buf[: len(data)] = data
        return prefix_int, shm
    raise PrefixClaimError(
        f"{CLAIM_ATTEMPTS} attempts to register a shared-memory group in /dev/shm each lost the race to "
        "another process starting a data loader on this host; start the job again"
    )


def _lowest_free_number(streams_local: list[str], streams_remote: list[str | None], retry: int) -> int:
    """The first number free under every segment name; a live group caching a remote stream in one of our
    folders is a UserError (two jobs would overwrite each other's cache)."""
    for attempt in range(1 + retry):
        try:
            return _scan(streams_local, streams_remote)
        except ValueError as error:
            if attempt == retry:
                raise UserError(
                    f"another data loader on this host caches a remote dataset in {', '.join(streams_local)}; "
                    "give this job a data.path of its own (data.streams[].path for a mixture)"
                ) from error
            time.sleep(TICK)  # streaming's grace: a group being released may still list the folder
    raise AssertionError("unreachable")


def _scan(streams_local: list[str], streams_remote: list[str | None]) -> int:
    """streaming's `_check_and_find` for every segment name, from one listing of /dev/shm.

    Streaming walks the numbers up to the first one free under a name and maps each existing segment on
    the way, keeping it open (its handle registers an atexit cleanup) until the process exits: on a host
    where other jobs left a hundred groups every scan holds hundreds of descriptors more (a few loaders
    run out of them, EMFILE), and a live group above a hole left by a killed one escapes its check for a
    shared cache folder. Here every `locals` segment is read as a file and closed, and the number is the
    lowest that no segment and no file lock of streaming's uses."""
    taken: set[int] = set()
    for entry in os.listdir(SHM_DIR):
        number, _, kind = entry.partition("_")
        if len(number) != 6 or not number.isdigit() or kind not in SHM_TO_CLEAN:
            continue
        taken.add(int(number))
        if kind == LOCALS and any(remote is not None for remote in streams_remote):
            try:
                with open(os.path.join(SHM_DIR, entry), "rb") as segment:
                    their_locals, _ = _unpack_locals(segment.read())
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
            for local, remote in zip(streams_local, streams_remote, strict=True):
                if remote is not None and local in their_locals:
                    raise ValueError(f"Reused local directory: {streams_local} vs {their_locals}")
    for prefix_int in itertools.count():
        locks = (
            os.path.join(gettempdir(), _get_path(prefix_int, lock))
            for lock in (BARRIER_FILELOCK, CACHE_FILELOCK)
        )
        if prefix_int not in taken and not any(os.path.exists(lock) for lock in locks):
            return prefix_int
    raise AssertionError("unreachable")


def _leaders_outcome(mine: Outcome, world: World) -> Outcome:
    """The local leader's outcome on every rank of its node; any leader's error on every rank of the job."""
    if not (dist.is_available() and dist.is_initialized()):
        return mine  # alone on its node: it is the leader
    outcomes: list[Outcome] = [-1] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    errors = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    if errors:  # every node's ranks stop, not only the failed node's: the others would wait at a barrier
        return errors[0]
    return outcomes[world.node * world.ranks_per_node]


def _attach_as_follower(streams_local: list[str], prefix_int: int) -> SharedMemory:
    """Attach to the group the local leader registered, checked as streaming checks it."""
    shm = SharedMemory(_get_path(prefix_int, LOCALS), False)
    their_locals, their_prefix_int = _unpack_locals(bytes(shm.buf))
    if streams_local != their_locals or prefix_int != their_prefix_int:
        raise PrefixClaimError(
            f"the local leader registered {their_locals} under {their_prefix_int}, this rank expected "
            f"{streams_local} under {prefix_int}: give every rank the same data.path and data.remote"
        )
    return shm


@contextmanager
def streaming_claims_prefix() -> Iterator[None]:
    """While the block runs, `StreamingDataset.__init__` registers its shared memory with `claim_shm_prefix`.

    Swapped for the block only (the main thread builds datasets), so that a plain `StreamingDataset`
    built elsewhere keeps streaming's own behaviour.
    """
    streaming_dataset.get_shm_prefix = claim_shm_prefix
    try:
        yield
    finally:
        streaming_dataset.get_shm_prefix = _STREAMING_GET_SHM_PREFIX
