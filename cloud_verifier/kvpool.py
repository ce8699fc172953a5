"""One KV cache shared by every session of a torch target, so that many sessions verify in one pass.

Why not transformers' own cache classes: a batch of sessions needs a different cached
length per row and a different rollback per row. ``DynamicCache`` crops the whole batch
at once, and ``StaticCache`` writes every row at the same position; copying sessions in
and out of either cost more than batching saved. So the pool keeps, per layer, one
tensor ``[slots, kv_heads, capacity, head_dim]``; a session owns a slot, its cached
length is ``len(state.tokens)`` and rollback is just shortening that list. A forward
pass over rows (slot s_b, start L_b, n new tokens) gets a small duck-typed cache
(``BatchView``) that writes row b's new keys at positions L_b.. of its slot and returns
the slots' keys up to the longest row; an explicit 4D mask lets query q of row b see
exactly positions 0..L_b+q of its own slot, so shorter rows ignore what lies beyond
their length (old tokens of a rolled-back draft, padding, a former owner's keys).

Token trees: a row's last nodes may form a tree (``trees``). They are written in wire order
like any tokens, but each node takes the rotary position of its depth and sees, among the
tree's slots, only its ancestors and itself. ``KVPool.compact`` then moves the accepted root
path's keys down to the positions a plain sequence would give them.

Bounded: at most ``max_slots`` slots, capacity at most the target's context, and at most
``max_bytes`` allocated (the verifier gives the pool half its memory budget). Slots and capacity
grow by doubling as sessions arrive and lengthen (an idle verifier holds little). Every slot has
the same capacity, so one long session makes every slot long: where that would pass ``max_bytes``
the pool keeps fewer slots (the sessions of the current pass first, then the most recently used)
instead of more bytes. When every slot is taken, the least recently used session not in the
current pass loses its slot; its next request recomputes its committed prefix (the verifier still
holds the token ids), which is the same cost as a resync without the round trip.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from privacy.messages import tree_depths


class BatchView:
    """The cache object handed to the model for one forward pass over several pool rows."""

    def __init__(self, pool: "KVPool", slots: list[int], starts: list[int], n: int,
                 trees: list[tuple[int, list[int]] | None] | None = None):
        self.pool, self.n = pool, n
        self.kv_len = max(starts) + n
        self.contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.slot_index = torch.tensor(slots)
        self.rows = self.slot_index[:, None]                                 # [B, 1]
        self.written = torch.tensor(starts)[:, None] + torch.arange(n)      # [B, n]: cache positions written
        self.positions = self.written                                       # [B, n]: rotary positions
        # trees[b] = (q, parents): row b's queries q.. are a tree's nodes (None: no tree in row b)
        self.trees = [(b, tree) for b, tree in enumerate(trees or ()) if tree is not None]
        if self.trees:
            self.positions = self.written.clone()
            for b, (q, parents) in self.trees:
                depth = tree_depths(parents)
                self.positions[b, q: q + len(parents)] = self.written[b, q] + torch.tensor(depth)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values ([B, heads, n, dim]) and return the rows' whole caches."""
        out = []
        for store, new in ((self.pool.keys[layer_idx], keys), (self.pool.values[layer_idx], values)):
            store[self.rows, :, self.written] = new.transpose(1, 2).to(store.dtype)     # [B, n, heads, dim]
            window = store[:, :, : self.kv_len]
            if self.contiguous:                                             # a view, no copy (e.g. one row)
                out.append(window[int(self.slot_index[0]): int(self.slot_index[0]) + len(self.slot_index)])
            else:
                out.append(window.index_select(0, self.slot_index))
        return out[0], out[1]

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, n, kv_len] additive mask: row b's query q sees its own slot's positions 0..L_b+q
        (a tree's node: the positions before the tree, its ancestors and itself)."""
        visible = torch.arange(self.kv_len)[None, None, :] <= self.written[:, :, None]
        for b, (q, parents) in self.trees:
            at = int(self.written[b, q])
            visible[b, q: q + len(parents), at: at + len(parents)] = _ancestry(parents)
        return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)[:, None]

    # transformers asks these of a cache in a few code paths; position ids are always passed explicitly.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len - self.n

    @property
    def is_compileable(self) -> bool:
        return False


def _ancestry(parents: list[int]) -> torch.Tensor:
    """[m, m] bool: entry (i, j) is true where node j is node i itself or one of its ancestors."""
    m = len(parents)
    seen = torch.eye(m, dtype=torch.bool)
    for i, parent in enumerate(parents):      # parents precede their children: row `parent` is complete
        if parent >= 0:
            seen[i] |= seen[parent]
    return seen


class PoolFull(RuntimeError):
    """A pass needs more slots at its length than ``max_bytes`` allows (the caller runs fewer rows at once)."""


class KVPool:
    """Per-layer key and value stores with one slot per session (see the module docstring)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, max_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, start_slots: int = 4, start_len: int = 128,
                 max_bytes: int | None = None):
        if max_slots < 1:
            raise ValueError("the KV pool needs at least one slot")
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.max_slots, self.max_len, self.start_len = max_slots, max_len, min(start_len, max_len)
        # keys and values of every layer at one position of one slot
        self.position_bytes = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.max_bytes = max_bytes
        self._longest: tuple[int | None, int] = (-1, 0)     # (max_bytes, longest_row()) once worked out
        self.slots, self.capacity = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.owners: dict[int, object] = {}            # slot -> the state holding it
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.free: list[int] = []
        self.evictions = 0
        self._grow(max(1, min(start_slots, max_slots, self.slots_fitting(self.start_len))), self.start_len)

    @property
    def allocated_bytes(self) -> int:
        return self.slots * self.capacity * self.position_bytes

    def _doubling(self, length: int) -> int:
        """`start_len` doubled until it holds `length` positions, at most max_len: the capacities the pool takes."""
        capacity = self.start_len
        while capacity < length:
            capacity *= 2
        return min(capacity, self.max_len)

    def capacity_for(self, length: int) -> int:
        """The capacity a row of `length` positions makes the pool grow to (it never grows smaller)."""
        return max(self.capacity, self._doubling(length))

    def _slots_at(self, capacity: int) -> int:
        if self.max_bytes is None:
            return self.max_slots
        return min(self.max_slots, self.max_bytes // (capacity * self.position_bytes))

    def slots_fitting(self, length: int) -> int:
        """How many slots the pool may hold once a row reaches `length` positions."""
        return self._slots_at(self.capacity_for(length))

    def longest_row(self) -> int:
        """The longest row one slot can hold within ``max_bytes`` (0: not even a first slot fits): the
        largest capacity the pool can take (start_len doubled, or max_len) that one slot of fits. Read
        on every pass, so worked out only when ``max_bytes`` changes."""
        if self._longest[0] != self.max_bytes:
            longest, capacity = 0, self.start_len
            while True:
                if self._slots_at(capacity) >= 1:
                    longest = capacity
                if capacity >= self.max_len:
                    break
                capacity = min(2 * capacity, self.max_len)
            self._longest = (self.max_bytes, longest)
        return self._longest[1]

    def _held_length(self) -> int:
        return max((len(owner.tokens) for owner in self.owners.values()), default=0)

    def limit_bytes(self, max_bytes: int) -> None:
        """Allocate at most `max_bytes` from now on (the verifier's budget share). A pool that holds more
        already gives it back at once: its capacity back down to what its sessions need (the longest
        ones lose their slots if even one slot of that does not fit), then fewer slots."""
        self.max_bytes = max_bytes
        if self.allocated_bytes <= max_bytes:
            return
        capacity = self._doubling(self._held_length())
        if self._slots_at(capacity) < 1:
            capacity = self.longest_row() or self.start_len
            for slot, owner in list(self.owners.items()):
                if len(owner.tokens) > capacity:
                    self._forget(slot)
                    self.evictions += 1
        self._reshape(min(self.slots, self._slots_at(capacity)), capacity, keep=set())

    def _stores(self, slots: int, capacity: int, rows: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """New key and value stores of `slots` x `capacity` holding the current stores' `rows` in their
        first slots, in that order. Every tensor is allocated before the caller swaps anything in, so a
        failed allocation (out of memory) leaves the pool as it was."""
        shape, width = (slots, self.kv_heads, capacity, self.head_dim), min(capacity, self.capacity)
        keys, values = ([torch.zeros(shape, dtype=self.dtype) for _ in range(self.layers)] for _ in range(2))
        if rows:
            kept = slice(0, len(rows)) if rows == list(range(len(rows))) else rows   # a view where slots stay
            for old, new in zip(self.keys + self.values, keys + values):
                new[: len(rows), :, :width] = old[kept, :, :width]
        return keys, values

    def _grow(self, slots: int, capacity: int) -> None:
        """More slots or capacity, every slot where it was."""
        slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        if (slots, capacity) == (self.slots, self.capacity):
            return
        self.keys, self.values = self._stores(slots, capacity, list(range(self.slots)))
        self.free.extend(range(self.slots, slots))
        self.slots, self.capacity = slots, capacity

    def _reshape(self, slots: int, capacity: int, keep: set[int]) -> None:
        """Another shape (fewer slots and more capacity, or the other way round): the slots in `keep`
        survive, then the most recently used, moved to the first slots (their rows must fit `capacity`);
        the other sessions lose theirs. A failed allocation leaves the pool as it was."""
        survivors = [s for s in self.recent if s in keep]
        survivors += [s for s in reversed(self.recent) if s not in keep][: max(0, slots - len(survivors))]
        order = sorted(survivors)
        keys, values = self._stores(slots, capacity, order)
        for slot in [s for s in self.owners if s not in survivors]:
            self._forget(slot)
            self.evictions += 1
        self.keys, self.values = keys, values
        moved = {old: new for new, old in enumerate(order)}
        self.owners = {moved[s]: owner for s, owner in self.owners.items()}
        for s, owner in self.owners.items():
            owner.cache = s
        self.recent = OrderedDict((moved[s], None) for s in self.recent)
        self.free = list(range(len(order), slots))
        self.slots, self.capacity = slots, capacity

    def reserve(self, length: int, keep: set[int] = frozenset()) -> None:
        """Make room for a row reaching `length` positions (doubling, at most max_len). Within ``max_bytes``
        the pool may keep fewer slots for that: the slots in `keep` (the pass's) keep their sessions, though
        perhaps at other indices (read ``state.cache`` afterwards). ``PoolFull`` if even those do not fit.

        Short of slots because one long row made every slot long, and that row gone: the capacity comes
        back down to what the sessions held need, for at least twice the slots."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the pool's maximum length {self.max_len}")
        if length <= self.capacity:
            if self.max_bytes is not None and not self.free and self.slots < self.max_slots:
                capacity = self._doubling(max(length, self._held_length()))
                if capacity < self.capacity and self._slots_at(capacity) >= 2 * self.slots:
                    self._reshape(self._slots_at(capacity), capacity, keep)
            return
        capacity, fitting = self.capacity_for(length), self.slots_fitting(length)
        if fitting < max(1, len(keep)):
            raise PoolFull(f"{max(1, len(keep))} rows of {length} positions need more than the KV pool's "
                           f"{self.max_bytes} bytes")
        if fitting >= self.slots:
            self._grow(self.slots, capacity)
        else:
            self._reshape(fitting, capacity, keep)

    def holds(self, state) -> bool:
        return state.cache is not None and self.owners.get(state.cache) is state

    def acquire(self, state, keep: set[int]) -> int:
        """A slot for `state` (its own if it still has one); may evict a session outside `keep`."""
        if self.holds(state):
            self.recent.move_to_end(state.cache)
            return state.cache
        room = self.slots_fitting(self.capacity)
        if not self.free and self.slots < room:
            self._grow(min(self.slots * 2, room), self.capacity)
        if self.free:
            slot = self.free.pop()
        else:
            slot = next((s for s in self.recent if s not in keep), None)
            if slot is None:
                raise PoolFull("every KV slot is in use by this pass: batch size exceeds the pool")
            self._forget(slot)
            self.evictions += 1
        self.owners[slot] = state
        self.recent[slot] = None
        state.cache = slot
        state.tokens.clear()            # the slot holds nothing of this session yet
        return slot

    def release(self, state) -> None:
        if self.holds(state):
            slot = state.cache
            self._forget(slot)
            self.free.append(slot)

    def _forget(self, slot: int) -> None:
        owner = self.owners.pop(slot)
        self.recent.pop(slot, None)
        owner.cache = None
        owner.tokens.clear()
        owner.tree_at = None

    def view(self, slots: list[int], starts: list[int], n: int,
             trees: list[tuple[int, list[int]] | None] | None = None) -> BatchView:
        if max(starts) + n > self.capacity:     # reserve() first: it may move the slots of the pass
            raise ValueError(f"a pass reaching {max(starts) + n} positions in a pool of capacity {self.capacity}")
        return BatchView(self, slots, starts, n, trees)

    def compact(self, state, at: int, path: list[int]) -> None:
        """Move the keys and values cached at positions at + path[j] to at + j (a tree's accepted path,
        node indices increasing, so each moves down or stays)."""
        if not self.holds(state) or not path or path == list(range(len(path))):
            return
        source = torch.tensor(path) + at
        for store in (*self.keys, *self.values):
            store[state.cache, :, at: at + len(path)] = store[state.cache, :, source]
