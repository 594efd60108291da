"""Issue 15.6: a journal whose last record a crash cut off is repaired, and the study goes on.

The crash is the state it leaves on disk: the journal cut in the middle of its last line (as a
process killed mid-write, or a full disk, leaves it), and that state with records appended after
it (as a rerun by an older cliptune left it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tests.faults._support import JOB, cli, retry_of, write_job

pytestmark = pytest.mark.faults


def _journal_job(folder: Path, n_trials: int = 3) -> Path:
    write_job(folder, JOB.replace("n_trials: 6", f"n_trials: {n_trials}").replace(
        "study: {name: fx,", "study: {name: fx, storage: 'journal:study.log',"))
    done = cli(folder, "tune", "job.yaml")
    assert done.returncode == 0, done.stderr
    return folder / "study.log"


def _tear(journal: Path, cut: int = 25) -> None:
    """The journal as a crash mid-write leaves it: its last line cut short."""
    os.truncate(journal, journal.stat().st_size - cut)


def _study(journal: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="fx", storage=storage)


def test_a_torn_last_record_is_cut_off_and_the_study_goes_on(tmp_path: Path) -> None:
    journal = _journal_job(tmp_path)
    _tear(journal)  # the last record: trial 2 COMPLETE, cut off
    best = cli(tmp_path, "best", "job.yaml")  # the first command to open it repairs it
    assert best.returncode == 0, best.stderr
    assert re.search(r"journal study.log: its last record was cut off by a crash mid-write "
                     r"\(\d+ bytes\); removed it \(kept in study.log.torn\)", best.stderr)
    again = cli(tmp_path, "tune", "job.yaml", "--n-trials", "5")
    assert again.returncode == 0, again.stderr
    trials = _study(journal).trials
    assert trials[2].state is TrialState.FAIL  # its end was never written: run again
    assert [t.state for t in trials if retry_of(t) == 2] == [TrialState.COMPLETE]
    assert sum(t.state is TrialState.COMPLETE for t in trials) == 5


def test_records_written_after_a_torn_one_are_kept(tmp_path: Path) -> None:
    journal = _journal_job(tmp_path)
    _tear(journal)
    _study(journal).set_user_attr("after", 1)  # appended by an older cliptune's rerun, joined
    joined = journal.read_bytes().splitlines()[-1]  # to the fragment: Optuna skips that line
    record = json.loads(joined[joined.index(b'{"op_code":', 1):])
    record["user_attr"] = {"later": 2}
    with open(journal, "a") as handle:  # a second record: now Optuna cannot read the journal
        handle.write(json.dumps(record, separators=(",", ":")) + "\n")
    with pytest.raises(ValueError, match="Expecting"):
        _study(journal)
    again = cli(tmp_path, "tune", "job.yaml", "--n-trials", "5")
    assert again.returncode == 0, again.stderr
    assert "kept the whole records, dropped the fragments" in again.stderr
    study = _study(journal)
    assert (study.user_attrs["after"], study.user_attrs["later"]) == (1, 2)
    assert sum(t.state is TrialState.COMPLETE for t in study.trials) == 5
    assert (tmp_path / "study.log.bak").exists()


def test_a_line_without_a_whole_record_says_which_line_to_remove(tmp_path: Path) -> None:
    journal = _journal_job(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:3], b'{"op_co\n', *lines[3:]]))
    done = cli(tmp_path, "tune", "job.yaml", "--n-trials", "5")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("cliptune tune: error: job.yaml: study.storage: The journal "
                           "'study.log' cannot be read: line 4 holds no whole record")
    assert "sed -i '4d' study.log" in line
