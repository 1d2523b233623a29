"""Data helpers: the R lazy-load DB reader, paragraph re-flow, token windows, text files."""

import struct
import zlib

import pytest
import torch
from austen import _novel_name, read_rdb_string_vectors, reflow

from hf_ptq_plugin.calibration.text import first_windows, read_text, spread_windows


def _r_serialize(strings, r_type=16):
    """An R XDR serialization (version 3) of a character vector, built by hand from R's format."""
    raw = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    raw += struct.pack(">ii", r_type, len(strings))
    for s in strings:
        if s is None:
            raw += struct.pack(">ii", 9, -1)
        else:
            data = s.encode("utf-8")
            raw += struct.pack(">ii", 0x40009, len(data)) + data
    return raw


def _block(raw):
    return struct.pack(">I", len(raw)) + zlib.compress(raw)


def test_rdb_reader_returns_every_character_vector_and_skips_other_objects():
    novel = ["PRIDE AND PREJUDICE", "", "It is a truth universally", "acknowledged.", None, "Chapter 2"]
    other = _r_serialize([], r_type=13)  # an integer vector: not text
    data = _block(_r_serialize(novel)) + _block(other) + _block(_r_serialize(["EMMA", "é"]))
    vectors = list(read_rdb_string_vectors(data))
    assert vectors == [novel, ["EMMA", "é"]]
    assert _novel_name(vectors[0]) == "pride_and_prejudice" and _novel_name(["  ", "Persuasion"]) == "persuasion"


def test_reflow_joins_lines_into_paragraphs():
    assert reflow(["a", "b", "", "", "c", None, "d"]) == "a b\n\nc\n\nd\n"


def test_first_windows_are_consecutive_and_spread_windows_cover_the_text():
    ids = torch.arange(100)
    assert torch.equal(first_windows(ids, 10, 3), torch.arange(30).view(3, 10))
    spread = spread_windows(ids, 10, 3)
    assert spread[:, 0].tolist() == [0, 40, 90]  # starts at windows round(0, 4.5, 9), half to even
    with pytest.raises(ValueError, match="10 windows of 10, 11 requested"):
        first_windows(ids, 10, 11)


def test_read_text_reads_a_file_or_a_folder_and_names_a_bad_path(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert read_text(tmp_path) == "first\n\nsecond"
    assert read_text(tmp_path / "a.txt") == "first"
    with pytest.raises(ValueError, match="missing.txt' does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        read_text(tmp_path / "empty")


def test_mmlu_subset_takes_the_first_questions_of_every_subject_in_file_order():
    from mmlu_data import per_subject

    questions = [{"subject": s, "i": i} for i, s in enumerate("aabacbbca")]
    assert [q["i"] for q in per_subject(questions, 2)] == [0, 1, 2, 5, 4, 7]  # grouped: a, then b, then c
