"""Jane Austen's six novels (public domain), obtained offline from Debian's `r-cran-janeaustenr`.

The package stores each novel as an R character vector (one element per printed line) in
`data/Rdata.rdb`: a run of [4-byte big-endian length][zlib stream] blocks, each an R XDR
serialization. We read those vectors, identify each novel by its title line, and re-flow the
lines into paragraphs: real English text for the demo, the benchmarks and tests.
"""

import logging
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"
RDB_PATH = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
TITLES = {
    "SENSE AND SENSIBILITY": "sense_and_sensibility",
    "PRIDE AND PREJUDICE": "pride_and_prejudice",
    "MANSFIELD PARK": "mansfield_park",
    "EMMA": "emma",
    "NORTHANGER ABBEY": "northanger_abbey",
    "PERSUASION": "persuasion",
}
EVAL_NOVEL = "pride_and_prejudice"
R_STRSXP, R_CHARSXP = 16, 9


def austen_novels(cache_dir: Path) -> dict:
    """{novel_name: text} for the six novels, extracted once into `cache_dir/austen/`."""
    folder = Path(cache_dir) / "austen"
    if not all((folder / f"{name}.txt").exists() for name in TITLES.values()):
        _extract(folder)
    return {name: (folder / f"{name}.txt").read_text(encoding="utf-8") for name in TITLES.values()}


def calibration_and_eval_texts(cache_dir: Path):
    """(calibration text = the five other novels, evaluation text = Pride and Prejudice)."""
    novels = austen_novels(cache_dir)
    calib = "\n\n".join(text for name, text in novels.items() if name != EVAL_NOVEL)
    return calib, novels[EVAL_NOVEL]


def _extract(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rdb = _download_rdb(Path(tmp))
        novels = {}
        for lines in read_rdb_string_vectors(rdb.read_bytes()):
            name = _novel_name(lines)
            if name:
                novels[name] = reflow(lines)
        missing = set(TITLES.values()) - set(novels)
        if missing:
            raise RuntimeError(f"{DEB_PACKAGE}: novels not found in {RDB_PATH}: {sorted(missing)}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent))
        for name, text in novels.items():
            (staging / f"{name}.txt").write_text(text, encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # atomic: the cache holds all six novels or none


def _download_rdb(tmp: Path) -> Path:
    logger.info("downloading Debian package %s", DEB_PACKAGE)
    subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
    return tmp / "root" / RDB_PATH


def read_rdb_string_vectors(data: bytes):
    """Yield each character vector (list of str, None for NA) stored in an R lazy-load DB."""
    pos = 0
    while pos + 4 <= len(data):
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data[pos + 4:])  # the 4-byte prefix is the inflated length
        pos = len(data) - len(inflater.unused_data)
        vector = _parse_string_vector(raw)
        if vector is not None:
            yield vector


def _parse_string_vector(raw: bytes):
    """Decode an R XDR serialization holding a character vector; None if it holds anything else."""
    if raw[:2] != b"X\n":
        return None
    version, = struct.unpack(">i", raw[2:6])
    pos = 14  # after format, version, writer version, minimal reader version
    if version == 3:  # version 3 adds the native encoding name
        nelen, = struct.unpack(">i", raw[pos:pos + 4])
        pos += 4 + nelen
    flags, length = struct.unpack(">ii", raw[pos:pos + 8])
    if flags & 0xFF != R_STRSXP:
        return None
    pos += 8
    strings = []
    for _ in range(length):
        flags, size = struct.unpack(">ii", raw[pos:pos + 8])
        pos += 8
        if flags & 0xFF != R_CHARSXP:
            raise ValueError(f"unexpected R type {flags & 0xFF} inside a character vector")
        strings.append(None if size == -1 else raw[pos:pos + size].decode("utf-8"))
        pos += max(size, 0)
    return strings


def _novel_name(lines) -> str:
    for line in lines:
        if line and line.strip():
            return TITLES.get(line.strip().upper(), "")
    return ""


def reflow(lines) -> str:
    """Join printed lines into paragraphs (blank lines separate paragraphs)."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"
