"""One session's view of its selected mailbox: message numbers and news.

Message sequence numbers belong to the session: they change only when this
session announces a change (RFC 3501 section 2.3.1.2).  The folder's
snapshot moves on as any session or program changes the Maildir; ``catch_up``
compares the two and says what to tell the client, in an order that keeps
its numbering right: EXPUNGE (highest number first), then EXISTS and RECENT,
then the FETCH FLAGS of messages whose flags changed.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from powermail.imap.parser import SequenceSet
from powermail.storage.maildirpp import Entry, Folder, Snapshot

__all__ = ["SelectedMailbox", "format_flags"]


def format_flags(flags: Iterable[str], *, recent: bool = False) -> str:
    """``(\\Seen Work)``: system flags first, then keywords, in a fixed order."""
    ordered = sorted(flags, key=lambda f: (not f.startswith("\\"), f))
    if recent:
        ordered.append("\\Recent")
    return "(" + " ".join(ordered) + ")"


class SelectedMailbox:
    """What one session has told its client about one folder."""

    def __init__(self, folder: Folder, snapshot: Snapshot, *, readonly: bool) -> None:
        self.folder = folder
        self.readonly = readonly
        self.uidvalidity = snapshot.uidvalidity
        self.uids: list[int] = [e.uid for e in snapshot.entries]
        self.flags: dict[int, frozenset[str]] = {
            e.uid: e.flags for e in snapshot.entries
        }
        self.recent: set[int] = set() if readonly else folder.claim_recent(self.uids)
        self.snapshot = snapshot

    # -- numbers -------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def resolve(self, numbers: SequenceSet, *, uid: bool) -> list[int]:
        """The UIDs a sequence set names, ascending, each once.

        For a UID set, ``*`` is the highest UID and ranges may cover gaps;
        a message-number set beyond the mailbox is the caller's BAD.
        """
        if not self.uids:
            return []
        found: set[int] = set()
        if uid:
            for low, high in numbers.resolve(self.uids[-1]):
                lo = bisect_left(self.uids, low)
                hi = bisect_right(self.uids, high)
                found.update(self.uids[lo:hi])
        else:
            for low, high in numbers.resolve(len(self.uids)):
                found.update(self.uids[low - 1 : high])
        return sorted(found)

    def valid_numbers(self, numbers: SequenceSet) -> bool:
        """Whether every message number in the set exists (RFC 3501 9)."""
        largest = len(self.uids)
        return all(
            1 <= lo and hi <= largest for lo, hi in numbers.resolve(max(largest, 1))
        ) and (largest > 0 or not numbers.ranges)

    def is_recent(self, uid: int) -> bool:
        return uid in self.recent

    def entry(self, uid: int) -> Entry | None:
        return self.snapshot.by_uid().get(uid)

    # -- catching up ---------------------------------------------------------

    def catch_up(self, snapshot: Snapshot, *, allow_expunge: bool) -> list[bytes]:
        """Untagged responses bringing the client to ``snapshot``."""
        if snapshot is self.snapshot and not self._pending_expunge(allow_expunge):
            return []
        out: list[bytes] = []
        current = snapshot.by_uid()
        if allow_expunge:
            gone = [u for u in self.uids if u not in current]
            for uid in reversed(gone):
                seq = self.seq_of(uid)
                assert seq is not None
                del self.uids[seq - 1]
                self.flags.pop(uid, None)
                self.recent.discard(uid)
                out.append(b"* %d EXPUNGE\r\n" % seq)
        last = self.uids[-1] if self.uids else 0
        added = [e.uid for e in snapshot.entries if e.uid > last]
        if added:
            self.uids.extend(added)
            for uid in added:
                self.flags[uid] = current[uid].flags
            if not self.readonly:
                self.recent.update(self.folder.claim_recent(added))
            out.append(b"* %d EXISTS\r\n" % len(self.uids))
            out.append(b"* %d RECENT\r\n" % len(self.recent))
        added_set = set(added)
        for seq, uid in enumerate(self.uids, start=1):
            entry = current.get(uid)
            if entry is None or uid in added_set:
                continue
            if entry.flags != self.flags.get(uid):
                self.flags[uid] = entry.flags
                flags = format_flags(entry.flags, recent=uid in self.recent)
                out.append(
                    b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, uid, flags.encode())
                )
        self.snapshot = snapshot
        return out

    def _pending_expunge(self, allow_expunge: bool) -> bool:
        return allow_expunge and len(self.uids) != len(self.snapshot.entries)

    def forget(self, uids: Iterable[int]) -> list[bytes]:
        """This session expunged ``uids``: EXPUNGE responses, highest first."""
        out = []
        for uid in sorted(uids, reverse=True):
            seq = self.seq_of(uid)
            if seq is None:
                continue
            del self.uids[seq - 1]
            self.flags.pop(uid, None)
            self.recent.discard(uid)
            out.append(b"* %d EXPUNGE\r\n" % seq)
        return out

    def note_flags(self, uid: int, flags: frozenset[str]) -> None:
        """The client was just told ``uid``'s flags (STORE, FETCH)."""
        if uid in self.flags:
            self.flags[uid] = flags
