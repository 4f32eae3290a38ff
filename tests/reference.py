"""A plain-Python model of the cache semantics the Writer must reproduce exactly.

A state is identified by its whole token prefix (a tuple), so this model
shares no code and no hashing with shmcache. Every writer operation ticks
the clock; inserts and matches stamp their path with it; eviction takes the
unpinned leaf with the oldest recency, and a parent inherits the recency of
a child evicted under it.

Reader matches tick nothing: they stamp the deepest state with the current
clock + 0.5 (after the last writer operation, before the next). Pins, the
writer's and readers', are held by handles naming nodes (not prefixes: a
prefix removed and inserted again is a new node, which an old handle does
not hold). A node with reader pins is never evicted; if a remove or clear
drops it, its record stays taken (a *ghost*) until the last handle naming
it is released. A new writer (``recover``) starts with no writer pins.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class RefError(Exception):
    """The operation must fail with ``kind`` ('dup', 'full') and change nothing."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class Node:
    value: int
    parent: tuple | None
    recency: float
    pins: int = 0
    rpins: int = 0
    children: set = field(default_factory=set)


class RefCache:
    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity = capacity
        self.bs = block_size
        self.nodes: dict[tuple, Node] = {}
        self.ghosts: list[Node] = []
        self.clock = 0

    def _blocks(self, tokens) -> list[tuple]:
        n = len(tokens) // self.bs
        return [tuple(tokens[: (i + 1) * self.bs]) for i in range(n)]

    def _path(self, tokens) -> list[tuple]:
        path = []
        for p in self._blocks(tokens):
            if p not in self.nodes:
                break
            path.append(p)
        return path

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def protected(self, p: tuple) -> bool:
        """Pinned, or above a pinned state: never evicted."""
        node = self.nodes[p]
        return node.pins > 0 or any(self.protected(c) for c in node.children)

    def _drop(self, p: tuple) -> int:
        node = self.nodes.pop(p)
        assert not node.children
        if node.parent is not None:
            self.nodes[node.parent].children.discard(p)
        if node.rpins:
            self.ghosts.append(node)
        return node.value

    def _evict_one(self, protect: tuple | None) -> int | None:
        leaves = [(n.recency, p) for p, n in self.nodes.items()
                  if not n.children and n.pins == 0 and n.rpins == 0 and p != protect]
        if not leaves:
            return None
        recency, p = min(leaves)
        parent = self.nodes[p].parent
        value = self._drop(p)
        if parent is not None:
            self.nodes[parent].recency = max(self.nodes[parent].recency, recency)
        return value

    def insert(self, tokens, values) -> tuple[int, list[int]]:
        blocks = self._blocks(tokens)
        path = self._path(tokens)
        k = len(path)
        new_values = list(values[k:])
        live_values = {n.value for n in self.nodes.values()}
        if any(v in live_values for v in new_values):
            raise RefError("dup")
        if len(set(new_values)) != len(new_values):
            raise RefError("dup")
        need = len(new_values) - (self.capacity - len(self.nodes) - len(self.ghosts))
        if need > 0:
            unprotected = {p for p, n in self.nodes.items() if not self.protected(p) and n.rpins == 0}
            if need > len(unprotected - set(path)):
                raise RefError("full")
        clock = self._tick()
        evicted = [self._evict_one(path[-1] if path else None) for _ in range(max(need, 0))]
        parent = path[-1] if path else None
        for p, v in zip(blocks[k:], new_values):
            self.nodes[p] = Node(v, parent, clock)
            if parent is not None:
                self.nodes[parent].children.add(p)
            parent = p
        for p in path:
            self.nodes[p].recency = clock
        return k * self.bs, evicted

    def match(self, tokens) -> list[int]:
        clock = self._tick()
        path = self._path(tokens)
        for p in path:
            self.nodes[p].recency = clock
        return [self.nodes[p].value for p in path]

    def _subtree(self, p: tuple) -> list[tuple]:
        out = []
        for c in list(self.nodes[p].children):
            out += self._subtree(c)
        return out + [p]

    def remove(self, values) -> list[int]:
        self._tick()
        removed = []
        for v in values:
            hit = [p for p, n in self.nodes.items() if n.value == v]
            for p in hit:
                for q in self._subtree(p):
                    removed.append(self._drop(q))
        return removed

    def evict(self, n: int) -> list[int]:
        self._tick()
        out = []
        for _ in range(n):
            v = self._evict_one(None)
            if v is None:
                break
            out.append(v)
        return out

    def pin(self, tokens) -> tuple[int, list[tuple[tuple, Node]]]:
        """A writer pin of the path of ``tokens``: (tokens pinned, handle)."""
        self._tick()
        handle = [(p, self.nodes[p]) for p in self._path(tokens)]
        for _, node in handle:
            node.pins += 1
        return len(handle) * self.bs, handle

    def unpin(self, handle: list[tuple[tuple, Node]]) -> int:
        """Release a writer pin: the nodes of ``handle`` still in the tree."""
        self._tick()
        held = [node for p, node in handle if self.nodes.get(p) is node]
        for node in held:
            node.pins -= 1
        return len(held) * self.bs

    def recover(self) -> None:
        """A new writer takes over: every writer pin is gone."""
        self._tick()
        for node in self.nodes.values():
            node.pins = 0

    def clear(self) -> list[int]:
        self._tick()
        values = [n.value for n in self.nodes.values()]
        self.ghosts += [n for n in self.nodes.values() if n.rpins]
        self.nodes.clear()
        return values

    def reader_match(self, tokens) -> list[Node]:
        """A reader's match: the path's nodes; stamps the deepest as a use."""
        path = [self.nodes[p] for p in self._path(tokens)]
        if path:
            path[-1].recency = max(path[-1].recency, self.clock + 0.5)
        return path

    def reader_pin(self, nodes: list[Node]) -> None:
        for n in nodes:
            n.rpins += 1

    def reader_unpin(self, nodes: list[Node]) -> None:
        for n in nodes:
            n.rpins -= 1
        self.ghosts = [g for g in self.ghosts if g.rpins]
