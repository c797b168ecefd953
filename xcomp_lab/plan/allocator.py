"""PyTorch's CUDA caching allocator, simulated over a stream of allocations and frees: what
`torch.cuda.max_memory_allocated` and `torch.cuda.max_memory_reserved` would report for it.

The rules are those of c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.x, default settings: no
`max_split_size_mb`, no expandable segments, no garbage-collection threshold, one stream):

- every request is rounded up to a multiple of 512 B (`round_size`, kMinBlockSize; at least 512 B);
- requests of at most 1 MiB (kSmallSize) come from the small pool, larger ones from the large pool;
- a request the pool cannot serve reserves a new segment (`get_allocation_size`): 2 MiB (kSmallBuffer) for a small
  request, 20 MiB (kLargeBuffer) for a request under 10 MiB (kMinLargeAlloc), else the request rounded up to
  2 MiB (kRoundLarge);
- a pool serves a request from its smallest free block that is large enough, the lowest address among equals
  (`get_free_block`, blocks ordered by size then address);
- a block larger than the request is split (`should_split`) when the rest is at least 512 B in the small pool, or
  more than 1 MiB in the large pool; otherwise the whole block is handed out, and counted as allocated;
- a freed block merges with free neighbours of its segment (`free_block`, `try_merge_blocks`);
- `empty_cache()` releases every segment with nothing allocated in it;
- when a new segment would exceed the card (`limit`), the free segments are released and the segment retried
  (`release_cached_blocks`); if it still does not fit, the request fails: an out-of-memory.

Which of two free blocks of one size best fit takes depends on their addresses, and the addresses cudaMalloc hands
out depend on the process's history (segments released earlier leave holes the driver reuses). On the H200 matrix,
the first model of a process reserved what new segments placed below the earlier ones give, to the byte (all eight
Llama 3 8B calls), and a model built later in the same process what segments placed above give (Mistral's eager
calls at 2048 tokens: 0.5 and 2 GiB apart between the two orders). `BothOrders` runs the simulation with both
and reports the larger figures, so that the order never makes the reserved peak an under-prediction. The planner
(`plan.estimate`) predicts a model loaded in a fresh process, as the matrix now measures every build, and so uses
the downward order alone (`CachingAllocator()`). `placement` and `move_segment` put segments at given addresses
instead: `plan.trace --gpu-addresses` gives a call the addresses its CUDA trace recorded, and with them the
simulation reserves what the GPU reserved (results/plan-matrix-h200/README.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to this come from the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: the segment for a large request under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge: larger segments are rounded up to this
TOP_ADDRESS = 1 << 47  # the simulated address space's top: segments are placed downwards from it


def round_size(nbytes: int) -> int:
    """The block size a request gets: a multiple of 512 B, at least 512 B."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The segment reserved (cudaMalloc) for a rounded request the pool cannot serve."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """The simulated card cannot reserve the segment a request needs."""

    def __init__(self, requested: int, reserved: int, allocated: int, limit: int) -> None:
        super().__init__(f"cannot allocate {requested} B: {allocated} B allocated, {reserved} B reserved of {limit} B")
        self.requested, self.reserved, self.allocated, self.limit = requested, reserved, allocated, limit


@dataclass(eq=False)
class Block:
    address: int
    size: int
    small: bool
    segment: int  # the address of its segment
    allocated: bool = False
    requested: int = 0  # the bytes asked for, while allocated
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.size, self.address)


class CachingAllocator:
    """The simulation: `malloc(nbytes)` returns a block, `free(block)` gives it back; statistics as CUDA's."""

    def __init__(self, limit: int | None = None, downward: bool = True) -> None:
        self.limit = limit
        self.downward = downward
        self.pools: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # free blocks, sorted by (size, address)
        self.free_blocks: dict[tuple[int, int], Block] = {}
        self.segments: dict[int, int] = {}  # segment address -> size
        self.members: dict[int, Block] = {}  # segment address -> one of its blocks (they are linked to each other)
        self.next_address = TOP_ADDRESS if downward else 0
        self.allocated = 0  # memory_allocated(): the sizes of the blocks handed out
        self.reserved = 0  # memory_reserved(): the sizes of the segments
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments_made = 0
        self.events: list[list] | None = None  # a list: every action appended, as a CUDA trace names it (`log`)
        # Where a new segment goes: given its size, an address (None: the next one in this allocator's order).
        self.placement: Callable[[int], int | None] | None = None

    def log(self, action: str, size: int) -> None:
        """Note an action ("alloc", "free_completed", "segment_alloc", "segment_free") when `events` is a list: for a
        block, the bytes asked for (as a CUDA trace records them), for a segment its size."""
        if self.events is not None:
            self.events.append([action, size])

    # ----- the pools -----

    def _insert(self, block: Block) -> None:
        bisect.insort(self.pools[block.small], block.key)
        self.free_blocks[block.key] = block

    def _remove(self, block: Block) -> None:
        pool = self.pools[block.small]
        del pool[bisect.bisect_left(pool, block.key)]
        del self.free_blocks[block.key]

    def _find(self, size: int, small: bool) -> Block | None:
        pool = self.pools[small]
        index = bisect.bisect_left(pool, (size,))
        if index == len(pool):
            return None
        block = self.free_blocks[pool[index]]
        self._remove(block)
        return block

    def _new_segment(self, size: int, small: bool) -> Block:
        total = segment_size(size)
        if self.limit is not None and self.reserved + total > self.limit:
            self.empty_cache()
            if self.reserved + total > self.limit:
                raise OutOfMemory(size, self.reserved, self.allocated, self.limit)
        address = self.placement(total) if self.placement is not None else None
        if address is None and self.downward:
            self.next_address -= total
            address = self.next_address
        elif address is None:
            address = self.next_address
            self.next_address += total
        self.segments[address] = total
        self.log("segment_alloc", total)
        self.segments_made += 1
        self.reserved += total
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = self.members[address] = Block(address, total, small, address)
        return block

    # ----- the API -----

    def malloc(self, nbytes: int) -> Block:
        """Allocate `nbytes` as the caching allocator does; the block handed out (it may be larger)."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._find(size, small) or self._new_segment(size, small)
        rest = block.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            tail = Block(block.address + size, rest, small, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(tail)
        block.allocated, block.requested = True, nbytes
        self.log("alloc", nbytes)
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        """Return a block to its pool, merged with its free neighbours."""
        block.allocated = False
        self.log("free_completed", block.requested)
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is None or neighbour.allocated:
                continue
            self._remove(neighbour)
            if neighbour is block.prev:
                block.address, block.prev = neighbour.address, neighbour.prev
                if neighbour.prev is not None:
                    neighbour.prev.next = block
            else:
                block.next = neighbour.next
                if neighbour.next is not None:
                    neighbour.next.prev = block
            block.size += neighbour.size
        self.members[block.segment] = block  # a merged neighbour may have been the one kept
        self._insert(block)

    def transient(self, nbytes: int) -> None:
        """Memory a kernel allocates and frees inside itself."""
        if nbytes:
            self.free(self.malloc(nbytes))

    def empty_cache(self) -> None:
        """Release every segment with nothing allocated in it (`torch.cuda.empty_cache()`)."""
        for key in [k for k, b in self.free_blocks.items() if b.prev is None and b.next is None]:
            block = self.free_blocks[key]
            self._remove(block)
            self.log("segment_free", self.segments[block.segment])
            self.reserved -= self.segments.pop(block.segment)
            del self.members[block.segment]

    def reset_peaks(self) -> None:
        """`torch.cuda.reset_peak_memory_stats()`: the peaks restart from the current figures."""
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def move_segment(self, address: int, to: int) -> None:
        """Put the segment at `address` at `to`, its blocks (free and allocated) with it."""
        if address not in self.segments:
            raise ValueError(f"no segment at {address:#x}: the segments are at "
                             f"{', '.join(f'{a:#x}' for a in sorted(self.segments))}.")
        block = self.members.pop(address)
        while block.prev is not None:
            block = block.prev
        self.members[to] = block
        delta = to - address
        while block is not None:
            if not block.allocated:
                self._remove(block)
            block.address, block.segment = block.address + delta, to
            if not block.allocated:
                self._insert(block)
            block = block.next
        self.segments[to] = self.segments.pop(address)


class BothOrders:
    """Two simulations of one stream, new segments placed downwards and upwards; figures are the larger of the two."""

    def __init__(self, limit: int | None = None) -> None:
        self.orders = (CachingAllocator(limit, downward=True), CachingAllocator(limit, downward=False))

    def malloc(self, nbytes: int) -> tuple[Block, Block]:
        return tuple(a.malloc(nbytes) for a in self.orders)

    def free(self, blocks: tuple[Block, Block]) -> None:
        for allocator, block in zip(self.orders, blocks):
            allocator.free(block)

    def empty_cache(self) -> None:
        for allocator in self.orders:
            allocator.empty_cache()

    def reset_peaks(self) -> None:
        for allocator in self.orders:
            allocator.reset_peaks()

    @property
    def allocated(self) -> int:
        return max(a.allocated for a in self.orders)

    @property
    def reserved(self) -> int:
        return max(a.reserved for a in self.orders)

    @property
    def peak_allocated(self) -> int:
        return max(a.peak_allocated for a in self.orders)

    @property
    def peak_reserved(self) -> int:
        return max(a.peak_reserved for a in self.orders)
