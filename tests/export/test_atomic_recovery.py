"""atomic_directory after a kill, and where it saves: a save killed at any step leaves the old or the new
checkpoint (restored by the next save, or by recover_interrupted_save for a loader) and no leftovers; a live
save's directories are never touched; the saved directory follows the umask; ".", "x/.." and symlinks resolve
to the real directory; symlinks in it stay symlinks; files describing another model do not survive an export.

A kill is simulated in a forked child that calls os._exit at a chosen step: like SIGKILL, it runs no cleanup,
no `finally` and no `except` of the save.
"""

import itertools
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, word_tokenizer

import hf_ptq_plugin.export.atomic as atomic
from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.export.atomic import atomic_directory, recover_interrupted_save
from hf_ptq_plugin.export.card_sections import DIALECT_NAMES

KILLED = 9
TOKENIZER = {"tokenizer.json": "shared tokenizer"}  # a file a save does not write: carried over


def write(destination, content, during=lambda: None):
    """A save writing two files that say which checkpoint they belong to."""
    with atomic_directory(destination) as staging:
        (staging / "config.json").write_text(content)
        during()
        (staging / "weights.bin").write_text(content)


def checkpoint(content):
    return {"config.json": content, "weights.bin": content, **TOKENIZER}


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def old_checkpoint(tmp_path):
    destination = tmp_path / "ckpt"
    write(destination, "old")
    (destination / "tokenizer.json").write_text(TOKENIZER["tokenizer.json"])
    return destination


def die():
    os._exit(KILLED)


def at_rename(number, after):
    """The number-th os.rename of the save: the old directory aside, the new one into place, the old one's discard."""
    def install():
        real, calls = os.rename, itertools.count(1)

        def rename(source, target):
            call = next(calls)
            if call == number and not after:
                die()
            real(source, target)
            if call == number and after:
                die()
        atomic.os.rename = rename
    return install


def before_swap():
    atomic._swap_in = lambda staging, destination: die()  # the staging directory is complete, marker written


def forked(run) -> int:
    """The pid of a forked child that runs `run` and exits (status 0, or 1 on an exception)."""
    pid = os.fork()
    if pid == 0:
        try:
            run()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return pid


def in_child(run):
    """Run `run` in a forked child; return its exit status (KILLED if it died at the step it was set to)."""
    _, status = os.waitpid(forked(run), 0)
    return os.waitstatus_to_exitcode(status)


def killed_save(destination, content, install=lambda: None, during=lambda: None):
    def run():
        install()
        write(destination, content, during)
    assert in_child(run) == KILLED, "the save was not killed where the test meant"


# (where the kill strikes, what the destination holds after recovery, what recovery says it restored)
KILL_POINTS = [
    ("while writing", dict(during=die), "old", None),
    ("staging complete, marker written", dict(install=before_swap), "old", None),
    ("old-copy directory made, nothing renamed", dict(install=at_rename(1, after=False)), "old", None),
    ("between the two renames", dict(install=at_rename(1, after=True)), "new", "new checkpoint"),
    ("marker removed, before the last rename", dict(install=at_rename(2, after=False)), "old", "previous checkpoint"),
    ("after the last rename", dict(install=at_rename(2, after=True)), "new", None),
    ("while deleting the old copy", dict(install=at_rename(3, after=True)), "new", None),
]


@pytest.mark.parametrize("point, kill, survivor, restored", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_recovery_after_a_kill_leaves_one_complete_checkpoint_and_no_leftovers(point, kill, survivor, restored,
                                                                                tmp_path):
    destination = old_checkpoint(tmp_path)
    killed_save(destination, "new", **kill)
    message = recover_interrupted_save(destination)
    assert files(destination) == checkpoint(survivor)
    assert (message is None) == (restored is None) and (restored is None or restored in message)
    assert os.listdir(tmp_path) == ["ckpt"]
    assert recover_interrupted_save(destination) is None  # nothing left to do


@pytest.mark.parametrize("kill, survivor", [(dict(install=before_swap), "new"),
                                            (dict(install=at_rename(1, after=False)), None)])
def test_a_killed_first_save_is_restored_only_if_complete(kill, survivor, tmp_path):
    destination = tmp_path / "ckpt"
    killed_save(destination, "new", **kill)
    recover_interrupted_save(destination)
    if survivor is None:  # its marker was gone already: nothing complete to restore, nothing was there before
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == ["ckpt"]
        assert files(destination) == {"config.json": survivor, "weights.bin": survivor}


@pytest.mark.parametrize("install", [at_rename(1, after=True), at_rename(2, after=False)],
                         ids=["new copy complete", "old copy only"])
def test_the_next_save_restores_first_and_carries_the_files_over_from_what_it_restored(install, tmp_path, caplog):
    destination = old_checkpoint(tmp_path)
    killed_save(destination, "new", install)
    assert not destination.exists()  # the state a kill between the two renames leaves
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        write(destination, "third")
    assert "was missing; restored" in caplog.text and str(destination) in caplog.text
    assert files(destination) == checkpoint("third")  # the tokenizer came from the restored copy
    assert os.listdir(tmp_path) == ["ckpt"]


def test_the_next_save_removes_stale_staging_and_old_copies(tmp_path):
    destination = old_checkpoint(tmp_path)
    killed_save(destination, "new", at_rename(1, after=False))  # a complete staging dir, an empty old-copy dir
    (tmp_path / ".ckpt.saving-ab_x1234").mkdir()  # mkdtemp's name, from an older version
    (tmp_path / ".ckpt.old-ab_x1234" / "ckpt").mkdir(parents=True)
    unrelated = [".ckpt.saving-notours", ".other.saving-12345678", ".ckpt.old"]
    for name in unrelated:
        (tmp_path / name).mkdir()
    assert len(os.listdir(tmp_path)) == 1 + 4 + len(unrelated)
    write(destination, "third")
    assert files(destination) == checkpoint("third")
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *unrelated])


def test_the_directories_of_a_running_save_are_left_alone(tmp_path):
    destination = old_checkpoint(tmp_path)
    with atomic_directory(destination) as staging:
        (staging / "config.json").write_text("new")
        assert recover_interrupted_save(destination) is None
        assert staging.exists()
        (staging / "weights.bin").write_text("new")
    assert files(destination) == checkpoint("new")


def test_a_save_paused_between_its_renames_is_not_undone_by_a_recovery(tmp_path):
    destination = old_checkpoint(tmp_path)
    paused, resume = os.pipe(), os.pipe()

    def pause():
        os.write(paused[1], b"x")
        os.read(resume[0], 1)

    def run():
        real = os.rename

        def rename(source, target):
            if Path(source).name.startswith(".ckpt.saving-"):  # the last rename: the new directory into place
                pause()
            real(source, target)
        atomic.os.rename = rename
        write(destination, "new")
    pid = forked(run)
    os.read(paused[0], 1)
    assert not destination.exists()
    assert recover_interrupted_save(destination) is None  # its staging and old copy are locked: in use
    assert len(os.listdir(tmp_path)) == 2
    os.write(resume[1], b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert files(destination) == checkpoint("new") and os.listdir(tmp_path) == ["ckpt"]


def test_a_missing_directory_without_leftovers_is_left_alone(tmp_path):
    assert recover_interrupted_save(tmp_path / "absent") is None
    assert recover_interrupted_save("org/model-on-the-hub") is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)], ids=["022", "077", "002"])
def test_a_new_directory_gets_the_mode_the_umask_gives(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        write(tmp_path / "ckpt", "new")
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o7777 == mode


def test_a_replaced_directory_keeps_its_mode(tmp_path):
    destination = old_checkpoint(tmp_path)
    destination.chmod(0o750)
    write(destination, "new")
    assert destination.stat().st_mode & 0o7777 == 0o750


@pytest.fixture
def int8_model():
    return quantize(tiny_llama(), PTQConfig(qformat="int8_wo"))


def logits_of(directory, token_ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory)(token_ids).logits


@pytest.mark.parametrize("spelling", [".", "path"])
def test_save_pretrained_into_the_working_directory(spelling, int8_model, token_ids, tmp_path, monkeypatch):
    destination = tmp_path / "ckpt"
    quantize(tiny_llama(seed=3), PTQConfig(qformat="int8_wo")).save_pretrained(destination)
    (destination / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(destination)
    int8_model.save_pretrained("." if spelling == "." else Path("."))
    assert os.getcwd() == str(destination)  # still in the directory, now the new one
    assert sorted(os.listdir(".")) == sorted(os.listdir(destination))
    assert os.listdir(tmp_path) == ["ckpt"] and (destination / "tokenizer.json").read_text() == "{}"
    with torch.no_grad():
        assert torch.equal(logits_of(destination, token_ids), int8_model(token_ids).logits)


def test_a_path_through_dot_dot_saves_into_the_directory_it_names(tmp_path, monkeypatch):
    destination = old_checkpoint(tmp_path)
    (destination / "sub").mkdir()
    (destination / "sub" / "notes.txt").write_text("kept")
    monkeypatch.chdir(destination / "sub")
    write("..", "new")
    write(tmp_path / "ckpt" / "sub" / "..", "third")
    assert files(destination) == checkpoint("third") | {"sub/notes.txt": "kept"}
    assert os.listdir(tmp_path) == ["ckpt"] and os.getcwd() == str(destination / "sub")


def test_symlinks_in_the_destination_stay_symlinks(tmp_path):
    destination = old_checkpoint(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tok").mkdir(parents=True)
    (elsewhere / "tok" / "vocab.txt").write_text("a b c")
    (elsewhere / "chat_template.jinja").write_text("{{ x }}")
    (destination / "tokenizer").symlink_to(elsewhere / "tok")
    (destination / "chat_template.jinja").symlink_to("../elsewhere/chat_template.jinja")  # relative
    (destination / "notes").mkdir()
    (destination / "notes" / "latest").symlink_to("../tokenizer.json")
    (destination / "dangling").symlink_to(tmp_path / "gone")
    write(destination, "new")
    assert os.readlink(destination / "tokenizer") == str(elsewhere / "tok")
    assert os.readlink(destination / "chat_template.jinja") == "../elsewhere/chat_template.jinja"
    assert os.readlink(destination / "notes" / "latest") == "../tokenizer.json"
    assert os.readlink(destination / "dangling") == str(tmp_path / "gone")
    assert (destination / "chat_template.jinja").read_text() == "{{ x }}"
    assert (destination / "notes" / "latest").read_text() == TOKENIZER["tokenizer.json"]


def test_a_destination_that_is_a_symlink_stays_one(tmp_path):
    real = old_checkpoint(tmp_path)
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "latest"
    link.symlink_to(real)
    write(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert files(real) == checkpoint("new")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "links"] and os.listdir(tmp_path / "links") == ["latest"]


# Files an earlier save or export wrote that describe its model: gone after any other export.
EARLIER_MODEL_FILES = {"quant_cfg.json": "{}", "rank1.safetensors": "", "generation_config.json": "{}",
                       "hf_quant_config.json": "{}", "model-00002-of-00002.safetensors": "",
                       "model.safetensors.index.json": "{}", "README.md": "an earlier model's card"}


def test_an_export_keeps_no_file_describing_an_earlier_model(token_ids, tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8"), forward_loop=lambda m: m(token_ids))
    destination = tmp_path / "ckpt"
    export_checkpoint(model, destination)  # unified: config, generation config, hf_quant_config, tensors, card
    unified = set(os.listdir(destination))
    word_tokenizer().save_pretrained(destination)
    tokenizer = set(os.listdir(destination)) - unified
    (destination / "notes.txt").write_text("mine")

    export_checkpoint(model, destination, target="trtllm-legacy")
    assert set(os.listdir(destination)) == {"README.md", "config.json", "rank0.safetensors", "notes.txt", *tokenizer}
    assert DIALECT_NAMES["trtllm-legacy"] in (destination / "README.md").read_text()

    export_checkpoint(model, destination, target="vllm")  # fp8: the unified checkpoint again
    names = set(os.listdir(destination))
    assert "rank0.safetensors" not in names and {"generation_config.json", "hf_quant_config.json"} <= names
    assert tokenizer | {"notes.txt"} <= names and (destination / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name, content", EARLIER_MODEL_FILES.items())
def test_a_file_of_an_earlier_checkpoint_is_not_carried_over(name, content, tmp_path):
    destination = old_checkpoint(tmp_path)
    (destination / name).write_text(content)
    write(destination, "new")
    assert files(destination) == checkpoint("new")

