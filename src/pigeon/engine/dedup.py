"""The deduplication window: publisher-supplied message ids seen recently, per stream."""

from __future__ import annotations

from collections import OrderedDict


class DedupWindow:
    """Maps a message id to where it was stored, forgetting ids older than the window.

    Entries arrive in append order, so expiry pops from the front and stops at the first
    entry still inside the window.
    """

    def __init__(self, window_s: float) -> None:
        self._window_ns = int(window_s * 1e9)
        # id -> (partition, offset, timestamp_ns)
        self._entries: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, message_id: str, now_ns: int) -> tuple[int, int] | None:
        self.expire(now_ns)
        entry = self._entries.get(message_id)
        return None if entry is None else (entry[0], entry[1])

    def add(self, partition: int, entries: list[tuple[str, int, int]]) -> None:
        if self._window_ns <= 0:
            return
        for message_id, offset, timestamp_ns in entries:
            self._entries[message_id] = (partition, offset, timestamp_ns)

    def resize(self, window_s: float) -> None:
        """A new window length; ids already forgotten stay forgotten when it grows."""
        self._window_ns = int(window_s * 1e9)

    def sort(self) -> None:
        """Restore time order after merging entries recovered from several partitions."""
        self._entries = OrderedDict(sorted(self._entries.items(), key=lambda item: item[1][2]))

    def expire(self, now_ns: int) -> None:
        horizon = now_ns - self._window_ns
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if first[2] >= horizon:
                break
            entries.popitem(last=False)

    def entries_for(self, partition: int) -> list[tuple[str, int, int]]:
        return [(mid, e[1], e[2]) for mid, e in self._entries.items() if e[0] == partition]
