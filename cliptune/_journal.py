"""Open a journal storage (``journal:PATH``), repairing what a crash mid-write leaves behind.

Optuna appends each record to the file as one JSON line. A process killed (or a disk filled) in
the middle of a write leaves the last line cut off. Optuna still reads such a file (it skips an
unfinished last line), but the next record appended joins the fragment into a line that is not
JSON, and from then on the study cannot be read (``Expecting ':' delimiter``). So before Optuna
opens the journal, under the journal's own lock:

- an unfinished last line is cut off (and kept in ``PATH.torn``): the record it was is lost, as
  it was never written whole; a trial it would have finished is RUNNING and is retried;
- a line that is a fragment followed by a whole record (what a rerun by an older cliptune left)
  keeps the record and drops the fragment (the journal before is kept in ``PATH.bak``).

A line that holds no whole record is not guessed at: the error says which line to remove.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

log = logging.getLogger("cliptune")
_RECORD = b'{"op_code":'  # how every record of Optuna's journal starts


def open_journal(path: str) -> optuna.storages.JournalStorage:
    """Optuna's JournalStorage on ``path`` (created when missing), repaired first if torn.

    Raises:
        OSError: The file cannot be created or read.
        ValueError: A line of the journal holds no whole record (the message says what to do).
    """
    backend = JournalFileBackend(path)  # creates the file
    _repair(path, _cut_torn_tail)
    try:
        return optuna.storages.JournalStorage(backend)
    except ValueError as exc:  # a record that is not JSON (json.JSONDecodeError is a ValueError)
        if not _repair(path, _keep_whole_records):
            raise _unreadable(path, exc) from None
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    except ValueError as exc:
        raise _unreadable(path, exc) from None


def _repair(path: str, fix: object) -> bool:
    """Run ``fix(path)`` under the journal's lock (no writer is mid-record then); its answer."""
    lock = JournalFileSymlinkLock(path)
    try:
        lock.acquire()
    except OSError as exc:  # a read-only folder: read the journal as it is
        log.warning("journal %s: cannot take its lock to check it (%s)", path, exc)
        return False
    try:
        return fix(path)  # type: ignore[operator,no-any-return]
    finally:
        lock.release()


def _cut_torn_tail(path: str) -> bool:
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            return False
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return False
        handle.seek(0)
        data = handle.read()
    cut = data.rfind(b"\n") + 1
    fragment = data[cut:]
    try:
        json.loads(fragment)
    except ValueError:
        with open(f"{path}.torn", "ab") as kept:
            kept.write(fragment + b"\n")
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        log.warning("journal %s: its last record was cut off by a crash mid-write (%d bytes); "
                    "removed it (kept in %s.torn) so that the study can go on", path,
                    len(fragment), path)
        return True
    with open(path, "ab") as handle:  # a whole record whose newline was not written
        handle.write(b"\n")
    return True


def _keep_whole_records(path: str) -> bool:
    """Drop the torn fragment in front of a whole record; False if a line has no whole record."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    fixed, repaired = [], []
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
            fixed.append(line)
            continue
        except ValueError:
            pass
        record = _whole_record(line)
        if record is None:
            return False
        fixed.append(record)
        repaired.append(number)
    if not repaired:
        return False
    shutil.copyfile(path, f"{path}.bak")
    Path(path).write_bytes(b"".join(fixed))
    log.warning("journal %s: line(s) %s held a record cut off by a crash with the next record "
                "written after it; kept the whole records, dropped the fragments (the journal "
                "before is in %s.bak)", path, ", ".join(map(str, repaired)), path)
    return True


def _whole_record(line: bytes) -> bytes | None:
    start = line.find(_RECORD, 1)
    while start != -1:
        try:
            json.loads(line[start:])
            return line[start:]
        except ValueError:
            start = line.find(_RECORD, start + 1)
    return None


def _unreadable(path: str, exc: Exception) -> ValueError:
    number = _first_bad_line(path)
    where = f"line {number}" if number else "a line"
    return ValueError(f"The journal {path!r} cannot be read: {where} holds no whole record "
                      f"({exc}). Remove that line (sed -i '{number or 'N'}d' {path}; the study "
                      "loses that record only), or restore the journal from a copy.")


def _first_bad_line(path: str) -> int | None:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                json.loads(line)
            except ValueError:
                return number
    return None


__all__ = ["open_journal"]
