"""Compiled bookkeeping of the decoded-tile cache: a batch's lookups, announcements and stores in one call each.

A batch of 64 random patches touches ~200 tiles. Kept in Python dicts and ordered dicts, every one of them is a
few dict operations per lookup, announcement, withdrawal and store, under the GIL, and they run right after
kernels that streamed tens of MB, with cold CPU caches: ~5-8 µs of GIL-held time per patch in the service
(``bench.gil_serial --top``). Here the cache's index is plain integer arrays and each of those operations is
one compiled call for all the keys of a batch, without the GIL.

The state, all int64 arrays owned by :class:`~loader_service.slides.cache.TileCache` (which serialises every
call with its lock):

- ``table``: (2**k, 2) open-addressing hash table, linear probing, ``(key, slot)`` rows, :data:`EMPTY` keys
  free; deletion shifts the following rows back (no tombstones). Kept at most half full by the caller.
- ``expected``: the same kind of table, ``(key, announced reads pending)``.
- ``slots``: one row per stored tile (:data:`SLOT_FIELDS`); ``free``: a stack of the free rows.
- ``counters``: :data:`COUNTERS`.

Recency is a stamp from a clock that ticks at every use; eviction takes the unpinned idle tile with the
smallest stamp, or, for a tile with reads announced, the unpinned wanted tile with the smallest stamp: the same
order as one LRU list per kind (``move_to_end`` at every use). A scan over the slots finds it: O(entries) per
eviction, compiled and without the GIL, against a tile decode that costs far more.
"""

from __future__ import annotations

import numpy as np

from loader_service._numba_jit import eager_jit

__all__ = ["EMPTY", "SLOT_FIELDS", "COUNTERS", "FREE_ROW", "IDLE", "WANTED"]

EMPTY = -1
#: columns of ``slots``: the tile's key, data address, size in bytes, recency stamp, pins (reads copying from
#: it right now: never evicted) and state (:data:`FREE_ROW`, :data:`IDLE`, :data:`WANTED`)
SLOT_FIELDS = ("key", "address", "nbytes", "stamp", "pins", "state")
KEY, ADDR, NBYTES, STAMP, PINS, STATE = range(6)
FREE_ROW, IDLE, WANTED = 0, 1, 2
#: entries of ``counters``
COUNTERS = ("clock", "bytes", "hits", "misses", "evictions", "entries", "expected", "free", "capacity")
CLOCK, BYTES, HITS, MISSES, EVICTIONS, ENTRIES, EXPECTED, FREE, CAPACITY = range(9)

_TABLE = "int64[:, ::1]"


@eager_jit("int64(int64, int64)")
def _home(key, mask):  # type: ignore[no-untyped-def]
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: keys differ in their low bits
    return np.int64(h >> np.uint64(32)) & mask


@eager_jit(f"int64({_TABLE}, int64)")
def find(table, key):  # type: ignore[no-untyped-def]
    """The row of ``key`` (>= 0), or ``-1 - row`` of the empty row where it would go."""
    mask = table.shape[0] - 1
    i = _home(key, mask)
    while True:
        k = table[i, 0]
        if k == key:
            return i
        if k == EMPTY:
            return -1 - i
        i = (i + 1) & mask


@eager_jit(f"void({_TABLE}, int64)")
def _delete(table, i):  # type: ignore[no-untyped-def]
    """Empty row ``i``, moving back the rows after it that would no longer be found (backward-shift deletion)."""
    mask = table.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        k = table[j, 0]
        if k == EMPTY:
            break
        h = _home(k, mask)
        if (j > i and (h <= i or h > j)) or (j < i and h <= i and h > j):
            table[i, 0] = k
            table[i, 1] = table[j, 1]
            i = j
    table[i, 0] = EMPTY


@eager_jit(f"void({_TABLE}, {_TABLE})")
def rehash(old, new):  # type: ignore[no-untyped-def]
    """Insert every row of ``old`` into the empty table ``new`` (a larger power of two)."""
    for i in range(old.shape[0]):
        if old[i, 0] != EMPTY:
            j = -1 - find(new, old[i, 0])
            new[j, 0] = old[i, 0]
            new[j, 1] = old[i, 1]


@eager_jit(f"void(int64[::1], int64, {_TABLE}, {_TABLE}, int64[::1], int64[::1], int64[::1], int64[::1])")
def acquire(keys, pin, table, slots, counters, out_slot, out_address, out_nbytes):  # type: ignore[no-untyped-def]
    """Look ``keys`` up: each found tile's slot, address and size (-1, 0, 0 when missing), marked as just used,
    counted as hits and misses, and pinned when ``pin`` (1) until :func:`release`."""
    for n in range(keys.shape[0]):
        i = find(table, keys[n])
        if i < 0:
            counters[MISSES] += 1
            out_slot[n], out_address[n], out_nbytes[n] = -1, 0, 0
            continue
        s = table[i, 1]
        counters[CLOCK] += 1
        counters[HITS] += 1
        slots[s, STAMP] = counters[CLOCK]
        slots[s, PINS] += pin
        out_slot[n], out_address[n], out_nbytes[n] = s, slots[s, ADDR], slots[s, NBYTES]


@eager_jit(f"void(int64[::1], {_TABLE})")
def release(pinned, slots):  # type: ignore[no-untyped-def]
    """Unpin the slots :func:`acquire` returned (-1 entries ignored)."""
    for s in pinned:
        if s >= 0:
            slots[s, PINS] -= 1


@eager_jit(f"void({_TABLE}, {_TABLE}, int64[::1], int64, int64, int64)")
def _restate(table, slots, counters, key, was, now):  # type: ignore[no-untyped-def]
    """A stored tile of ``key`` in state ``was`` moves to state ``now``, as the most recently used of them."""
    j = find(table, key)
    if j >= 0 and slots[table[j, 1], STATE] == was:
        s = table[j, 1]
        counters[CLOCK] += 1
        slots[s, STATE], slots[s, STAMP] = now, counters[CLOCK]


@eager_jit(f"int64(int64[::1], {_TABLE}, {_TABLE}, {_TABLE}, int64[::1])")
def expect(keys, expected, table, slots, counters):  # type: ignore[no-untyped-def]
    """One more announced read of each key; a stored idle tile becomes wanted (and the most recent of them).
    Returns how many keys had no read announced before. ``expected`` must have room for every key."""
    new = 0
    for key in keys:
        i = find(expected, key)
        if i >= 0:
            expected[i, 1] += 1
            continue
        i = -1 - i
        expected[i, 0], expected[i, 1] = key, 1
        counters[EXPECTED] += 1
        new += 1
        _restate(table, slots, counters, key, IDLE, WANTED)
    return new


@eager_jit(f"int64(int64[::1], {_TABLE}, {_TABLE}, {_TABLE}, int64[::1])")
def expected_done(keys, expected, table, slots, counters):  # type: ignore[no-untyped-def]
    """Withdraw one announced read of each key (keys never announced are ignored); a stored tile with none left
    becomes idle, the most recent of them. Returns how many keys have no read announced any more."""
    gone = 0
    for key in keys:
        i = find(expected, key)
        if i < 0:
            continue
        if expected[i, 1] > 1:
            expected[i, 1] -= 1
            continue
        _delete(expected, i)
        counters[EXPECTED] -= 1
        gone += 1
        _restate(table, slots, counters, key, WANTED, IDLE)
    return gone


@eager_jit(f"void(int64, {_TABLE}, {_TABLE}, int64[::1], int64[::1])")
def _drop(i, table, slots, free, counters):  # type: ignore[no-untyped-def]
    s = table[i, 1]
    _delete(table, i)
    counters[BYTES] -= slots[s, NBYTES]
    counters[ENTRIES] -= 1
    slots[s, STATE] = FREE_ROW
    free[counters[FREE]] = s
    counters[FREE] += 1


@eager_jit(f"int64({_TABLE}, int64)")
def _victim(slots, wanted_too):  # type: ignore[no-untyped-def]
    """The unpinned idle slot used least recently; else, if ``wanted_too``, the unpinned wanted one; else -1."""
    idle = wanted = -1
    for s in range(slots.shape[0]):
        state = slots[s, STATE]
        if state == FREE_ROW or slots[s, PINS] > 0:
            continue
        if state == IDLE:
            if idle < 0 or slots[s, STAMP] < slots[idle, STAMP]:
                idle = s
        elif wanted_too and (wanted < 0 or slots[s, STAMP] < slots[wanted, STAMP]):
            wanted = s
    return idle if idle >= 0 else wanted


@eager_jit(f"int64(int64[::1], int64[::1], int64[::1], {_TABLE}, {_TABLE}, {_TABLE}, int64[::1], int64[::1], "
           "int64[::1], int64[::1])")
def put_many(keys, addresses, sizes, table, expected, slots, free, counters, out_slot,  # type: ignore[no-untyped-def]
             released):
    """Store tiles one after the other, as the cache's ``put`` says: ``out_slot[n]`` is the slot of tile n, -1
    when it is not stored, -2 when the key is stored and pinned (kept as it is). The slots whose tiles left the
    cache (evicted or replaced) are ``released[:count]``; returns count. The caller has made room in ``table``
    and ``free`` for every key, and ``released`` as long as the slots plus the keys."""
    count = 0
    for n in range(keys.shape[0]):
        key, size = keys[n], sizes[n]
        out_slot[n] = -1
        if size > counters[CAPACITY]:
            continue
        i = find(table, key)
        if i >= 0:
            if slots[table[i, 1], PINS] > 0:
                out_slot[n] = -2
                continue
            released[count] = table[i, 1]
            count += 1
            _drop(i, table, slots, free, counters)
        wanted = find(expected, key) >= 0
        stored = True
        while counters[BYTES] + size > counters[CAPACITY]:
            v = _victim(slots, wanted)
            if v < 0:
                stored = False  # every other tile is wanted or being read, and this one is not wanted
                break
            released[count] = v
            count += 1
            _drop(find(table, slots[v, KEY]), table, slots, free, counters)
            counters[EVICTIONS] += 1
        if not stored:
            continue
        counters[FREE] -= 1
        s = free[counters[FREE]]
        i = -1 - find(table, key)
        table[i, 0], table[i, 1] = key, s
        counters[CLOCK] += 1
        slots[s, KEY], slots[s, ADDR], slots[s, NBYTES] = key, addresses[n], size
        slots[s, STAMP], slots[s, PINS], slots[s, STATE] = counters[CLOCK], 0, WANTED if wanted else IDLE
        counters[BYTES] += size
        counters[ENTRIES] += 1
        out_slot[n] = s
    return count


@eager_jit(f"int64({_TABLE}, {_TABLE}, int64[::1], int64[::1], int64[::1])")
def clear(table, slots, free, counters, released):  # type: ignore[no-untyped-def]
    """Drop every stored tile not pinned; their slots are ``released[:count]``, returns count."""
    count = 0
    for s in range(slots.shape[0]):
        if slots[s, STATE] != FREE_ROW and slots[s, PINS] == 0:
            released[count] = s
            count += 1
            _drop(find(table, slots[s, KEY]), table, slots, free, counters)
    return count
