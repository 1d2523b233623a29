"""save_pretrained killed with SIGKILL at random moments: after each kill, recover_interrupted_save leaves the
checkpoint of one of the two models being saved, complete (its files byte-identical to that model's checkpoint,
which reloads with its logits), and no `.saving-*` / `.old-*` directories.

The saving child is forked from this process, which has imported torch and transformers already (starting a
new interpreter would take seconds per kill). The kill times (fixed seed) are spread over two saves' duration,
measured first, so that they fall anywhere in a save: while writing, carrying over, or swapping.
"""

import collections
import itertools
import os
import random
import signal
import statistics
import threading
import time

import pytest
import torch
import tqdm.std
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.export.atomic import recover_interrupted_save

KILLS = 30
SEED = 20240613
CARD = "README.md"  # its usage snippets name the directory it was saved into: compared apart


def fp8_model(seed, token_ids):
    return quantize(tiny_llama(seed=seed), PTQConfig(qformat="fp8"), forward_loop=lambda m: m(token_ids))


def checkpoint_files(directory):
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.name != CARD}


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def subclasses(cls):
    for subclass in cls.__subclasses__():
        yield subclass
        yield from subclasses(subclass)


@pytest.fixture(autouse=True)
def progress_bar_lock_of_this_process(monkeypatch):
    """tqdm's default lock includes a semaphore shared with forked children: a child killed while holding it
    (a progress bar of the save) would block this process's next progress bar for ever. A threading lock is
    copied by the fork instead."""
    for cls in [tqdm.std.tqdm, *subclasses(tqdm.std.tqdm)]:
        if cls is tqdm.std.tqdm or "_lock" in vars(cls):
            monkeypatch.setattr(cls, "_lock", threading.RLock(), raising=False)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two fp8 models and the files of their checkpoints, each checked to reload with the model's logits."""
    token_ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    models, references = [], []
    for seed in (0, 1):
        model = fp8_model(seed, token_ids)
        directory = tmp_path_factory.mktemp("reference") / "ckpt"
        model.save_pretrained(directory)
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(directory), token_ids), logits(model, token_ids))
        models.append(model)
        references.append(checkpoint_files(directory))
    assert references[0] != references[1]
    return models, references, token_ids


def fork_saving(models, destination, saves=None):
    """Fork a child that saves the models in turn into `destination` (`saves` times, or until killed); return
    its pid once it starts."""
    ready, announce = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)  # OpenMP's pool does not survive a fork
            os.write(announce, b"x")
            for model in itertools.islice(itertools.cycle(models), saves):
                model.save_pretrained(destination)
            os._exit(0)
        finally:
            os._exit(1)  # a save raised
    os.read(ready, 1)
    os.close(ready)
    os.close(announce)
    return pid


def save_duration(models, destination):
    """How long a forked child takes for one save (longer than in this process: its memory is copied on write)."""
    durations = []
    for model in models * 2:
        start = time.perf_counter()
        _, status = os.waitpid(fork_saving([model], destination, saves=1), 0)
        durations.append(time.perf_counter() - start)
        assert os.waitstatus_to_exitcode(status) == 0
    return statistics.median(durations)


def kill_while_saving(models, destination, delay):
    """SIGKILL a child saving the models in turn, the first one first, `delay` seconds after it starts."""
    pid = fork_saving(models, destination)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the saving child died on its own"


def test_a_save_killed_at_random_moments_leaves_one_complete_checkpoint(saved_models, tmp_path):
    models, references, token_ids = saved_models
    destination = tmp_path / "ckpt"
    duration = save_duration(models, destination)
    rng = random.Random(SEED)
    survivors, restored, states = [1], 0, collections.Counter()  # save_duration saved the second model last
    for kill in range(KILLS):
        delay = rng.uniform(0, 1.25 * duration)  # mostly within the first save, which replaces the other model
        kill_while_saving(models[::-1] if survivors[-1] == 0 else models, destination, delay)  # the other first
        states[" ".join(sorted(name.split("-")[0] for name in os.listdir(tmp_path)))] += 1  # where it was killed
        restored += recover_interrupted_save(destination) is not None
        files = checkpoint_files(destination)
        assert files in references, f"kill {kill} after {delay * 1e3:.2f} ms left an incomplete checkpoint"
        assert (destination / CARD).stat().st_size > 0
        assert os.listdir(tmp_path) == ["ckpt"], f"kill {kill} after {delay * 1e3:.2f} ms left leftovers"
        survivors.append(references.index(files))
    reloaded = AutoModelForCausalLM.from_pretrained(destination)
    assert torch.equal(logits(reloaded, token_ids), logits(models[survivors[-1]], token_ids))
    print(f"save {duration * 1e3:.1f} ms; survivors {survivors}; left by the kills {dict(states)}; {restored} "
          "restored after a kill between the renames")
