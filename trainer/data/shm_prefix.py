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

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import streaming.base.dataset as streaming_dataset
import torch.distributed as dist
from streaming.base.constant import LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import (
    _check_and_find_retrying,
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
    """Streaming's scan: the first number free under every segment name; a live group caching a
    remote stream in one of our folders is a UserError (two jobs would overwrite each other's cache)."""
    try:
        return max(
            _check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
            for name in SHM_TO_CLEAN
        )
    except ValueError as error:  # streaming's "Reused local directory"
        raise UserError(
            f"another data loader on this host caches a remote dataset in {', '.join(streams_local)}; "
            "give this job a data.path of its own (data.streams[].path for a mixture)"
        ) from error


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
