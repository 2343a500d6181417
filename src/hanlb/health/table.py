"""A host's health/load table and its checksums (claims 7, 67-74).

The table has one row per application endpoint on the host; a *portion* is
one application's row. The host agent holds the authoritative table, each
handler a cached copy of it.

Checksums are BLAKE2b (16-byte digest) over a canonical encoding:

- a row encodes as the msgpack array
  ``[app, up, active_connections, float(cpu), float(app_load), weight]``
  (floats always as float64);
- a portion's checksum is BLAKE2b(key-less, person ``hanlb-portion``) of its
  row's encoding;
- the whole table's checksum is BLAKE2b(person ``hanlb-table``) of the row
  encodings concatenated in application-name order (msgpack arrays are
  self-delimiting). An empty table has a checksum too.

The version is not part of any checksum: two tables with the same rows have
the same checksums whatever their histories. Fractions are kept to three
decimals (``make_row``) so that measurement noise does not change the table
at every sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgpack

from .messages import CHECKSUM_SIZE, PortionSum, TableRow

__all__ = ["HealthTable", "make_row", "portion_checksum", "row_encoding", "table_checksum"]


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def make_row(
    app: str,
    up: bool,
    active_connections: int = 0,
    cpu: float = 0.0,
    app_load: float = -1.0,
    weight: int = 1,
) -> TableRow:
    """A row with fractions clamped to 0..1 and rounded to three decimals.

    ``app_load`` below 0 means unknown and is stored as -1.
    """
    load = -1.0 if app_load < 0 else round(_clamp(float(app_load), 0.0, 1.0), 3)
    return TableRow(
        app,
        bool(up),
        max(0, min(int(active_connections), 2**32 - 1)),
        round(_clamp(float(cpu), 0.0, 1.0), 3),
        load,
        int(weight),
    )


def row_encoding(row: TableRow) -> bytes:
    out = msgpack.packb(
        [
            row.app,
            bool(row.up),
            int(row.active_connections),
            float(row.cpu),
            float(row.app_load),
            int(row.weight),
        ],
        use_bin_type=True,
    )
    assert isinstance(out, bytes)
    return out


def portion_checksum(row: TableRow) -> bytes:
    return hashlib.blake2b(
        row_encoding(row), digest_size=CHECKSUM_SIZE, person=b"hanlb-portion"
    ).digest()


def table_checksum(rows: Iterable[TableRow]) -> bytes:
    h = hashlib.blake2b(digest_size=CHECKSUM_SIZE, person=b"hanlb-table")
    for row in sorted(rows, key=lambda r: r.app):
        h.update(row_encoding(row))
    return h.digest()


class HealthTable:
    """Rows by application name, a version, and cached checksums.

    ``put`` and ``remove`` bump the version when they change something;
    ``apply`` (used by a handler's cache) takes rows and the version from a
    snapshot instead.
    """

    def __init__(self, rows: Iterable[TableRow] = (), version: int = 0) -> None:
        self._rows: dict[str, TableRow] = {}
        self._sums: dict[str, bytes] = {}
        self._whole: bytes | None = None
        self.version = version
        for row in rows:
            self._set(row)

    # -- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, app: object) -> bool:
        return app in self._rows

    def row(self, app: str) -> TableRow | None:
        return self._rows.get(app)

    def rows(self) -> list[TableRow]:
        """Every row, in application-name order."""
        return [self._rows[a] for a in sorted(self._rows)]

    def checksum(self) -> bytes:
        if self._whole is None:
            self._whole = table_checksum(self._rows.values())
        return self._whole

    def portion_checksum(self, app: str) -> bytes | None:
        return self._sums.get(app)

    def portion_sums(self) -> list[PortionSum]:
        return [PortionSum(a, self._sums[a]) for a in sorted(self._rows)]

    def snapshot(self, portions: Iterable[str] = ()) -> list[TableRow]:
        """The rows of ``portions`` that exist (all rows if ``portions`` is empty)."""
        wanted = list(portions)
        if not wanted:
            return self.rows()
        return [self._rows[a] for a in sorted(set(wanted)) if a in self._rows]

    def differing(self, sums: Iterable[PortionSum]) -> list[str]:
        """Portions whose checksum differs from ``sums`` (missing on either side too)."""
        theirs = {s.portion: s.checksum for s in sums}
        names = set(theirs) | set(self._rows)
        return sorted(a for a in names if theirs.get(a) != self._sums.get(a))

    # -- changing ------------------------------------------------------------------

    def put(self, row: TableRow) -> bool:
        """Store ``row``; True (and version + 1) if that changed the table."""
        if self._rows.get(row.app) == row:
            return False
        self._set(row)
        self.version += 1
        return True

    def remove(self, app: str) -> bool:
        if app not in self._rows:
            return False
        del self._rows[app], self._sums[app]
        self._whole = None
        self.version += 1
        return True

    def apply(self, rows: Iterable[TableRow], version: int, whole: bool) -> set[str]:
        """Take a snapshot's rows; a whole snapshot also drops rows it lacks.

        Returns the portions whose content changed.
        """
        incoming = {r.app: r for r in rows}
        changed = {a for a, r in incoming.items() if self._rows.get(a) != r}
        if whole:
            for app in [a for a in self._rows if a not in incoming]:
                del self._rows[app], self._sums[app]
                changed.add(app)
        for row in incoming.values():
            self._set(row)
        self._whole = None
        self.version = version
        return changed

    def _set(self, row: TableRow) -> None:
        self._rows[row.app] = row
        self._sums[row.app] = portion_checksum(row)
        self._whole = None
