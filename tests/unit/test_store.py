"""The one store: atomic files with the usual modes, keyed journals with one rule for damaged lines."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from persona.core.store import (
    KeyedJournal,
    atomic_write,
    check_signature,
    read_journal,
    write_jsonl,
    write_text,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_the_umask_mode_and_keep_the_mode_they_replace(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = write_text(tmp_path / "a.txt", "x")
        assert mode(fresh) == 0o644
        existing = tmp_path / "b.txt"
        existing.write_text("old")
        existing.chmod(0o640)
        write_text(existing, "new")
        assert existing.read_text() == "new" and mode(existing) == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "keep.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_jsonl_is_one_compact_utf8_line_a_record_non_ascii_kept(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "café", "n": 1}, {"q": None}])
    assert path.read_bytes() == '{"q": "café", "n": 1}\n{"q": null}\n'.encode()
    assert write_jsonl(tmp_path / "empty.jsonl", []).read_bytes() == b""


def test_a_damaged_line_mid_file_is_named_set_aside_and_no_intact_row_is_lost(tmp_path, caplog):
    journal = KeyedJournal(tmp_path / "j.jsonl", ("k",))
    journal.path.write_bytes(b'{"k": 1}\nnot json\n{"k": 2}\n[1, 2]\n{"k": 3, "v"')
    with caplog.at_level(logging.WARNING):
        assert sorted(journal.load()) == [(1,), (2,)]
    assert "j.jsonl:2" in caplog.text and "j.jsonl:4" in caplog.text and "j.jsonl:5" in caplog.text
    journal.append([{"k": 3}])
    assert [row["k"] for row in read_journal(journal.path)[0]] == [1, 2, 3]
    assert read_journal(journal.path)[1] == []
    aside = journal.damaged_path.read_text()
    assert "j.jsonl:2\nnot json" in aside and '{"k": 3, "v"' in aside


def test_the_first_row_of_a_key_wins_and_appends_are_whole_lines(tmp_path):
    journal = KeyedJournal(tmp_path / "j.jsonl", ("k", "n"))
    journal.append([{"k": "a", "n": 1, "v": 1}, {"k": "a", "n": 1, "v": 2}, {"k": "a", "n": 2, "v": 3}])
    assert journal.load() == {("a", 1): {"k": "a", "n": 1, "v": 1}, ("a", 2): {"k": "a", "n": 2, "v": 3}}
    assert journal.path.read_bytes().endswith(b"\n")


def test_a_run_with_other_settings_is_refused_and_a_foreign_output_is_not_adopted(tmp_path):
    meta = tmp_path / "run" / "meta.json"
    kwargs = dict(command="persona x", subject=tmp_path / "run", fix="choose another --run_dir")
    check_signature(meta, {"seed": 0}, **kwargs)
    check_signature(meta, {"seed": 0}, **kwargs)  # same settings: resume
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 there, 1 now\).*another --run_dir"):
        check_signature(meta, {"seed": 1}, **kwargs)
    foreign = tmp_path / "theirs.csv"
    foreign.write_text("a,b\n")
    with pytest.raises(ValueError, match="theirs.csv exists but was not written by `persona x`"):
        check_signature(tmp_path / "theirs.csv.meta.json", {}, owned=[foreign], **kwargs)
