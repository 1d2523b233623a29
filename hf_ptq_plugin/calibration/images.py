"""Image+text calibration for vision-language models: captioned images through the model's processor.

A VLM's language model reads image tokens (the projected vision features) as well as text. Text
alone leaves every activation statistic blind to them: SmoothQuant and AWQ scales, static FP8/INT8
input scales and GPTQ Hessians would all be fitted to text tokens. `image_text_forward_loop` turns
captioned images into model inputs with the model's own processor and chat template (one user turn
holding the image and a request for a description, one assistant turn holding the caption, as a
captioning conversation would run) and returns a forward loop for `quantize()`, optionally after
the text batches of another loop.

Captioned images come from a folder (`captions.jsonl` lines {"image": file, "caption": text}, files
relative to the folder), a list of (image, caption) pairs, or `synthetic_captioned_images(n)`:
scenes of coloured shapes drawn here with a caption that states what is drawn, for when no
captioned images are at hand (no download). Real photographs are the better calibration set.
"""

import json
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .data import CalibrationLoop

CAPTIONS_FILE = "captions.jsonl"
PROMPT = "Describe the image."
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245), "orange": (240, 140, 30), "purple": (140, 60, 170)}
SHAPES = ("circle", "square", "triangle")

CaptionedImage = Tuple[object, str]  # (PIL image, caption)


def synthetic_captioned_images(count: int, size: int = 224, seed: int = 0) -> List[CaptionedImage]:
    """`count` drawn scenes (1-3 shapes of named colours on a plain background) with their captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        background, *colours = rng.sample(sorted(COLOURS), 4)
        image = Image.new("RGB", (size, size), COLOURS[background])
        draw = ImageDraw.Draw(image)
        shapes = [(colours[i], rng.choice(SHAPES)) for i in range(rng.randint(1, 3))]
        for colour, shape in shapes:
            _draw_shape(draw, rng, shape, COLOURS[colour], size)
        things = [f"a {colour} {shape}" for colour, shape in shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        samples.append((image, f"{listed[0].upper()}{listed[1:]} on a {background} background."))
    return samples


def _draw_shape(draw, rng: random.Random, shape: str, fill: tuple, size: int) -> None:
    extent = rng.randint(size // 6, size // 3)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent, y + extent)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + extent // 2, y), (x, y + extent), (x + extent, y + extent)], fill=fill)


def load_captioned_images(source: Union[str, Path, Sequence[CaptionedImage]]) -> List[CaptionedImage]:
    """(image, caption) pairs from a folder with captions.jsonl, or a list of such pairs as given."""
    if not isinstance(source, (str, Path)):
        samples = list(source)
        if not samples or not all(isinstance(s, (tuple, list)) and len(s) == 2 for s in samples):
            raise ValueError("captioned images must be a non-empty list of (image, caption) pairs or a folder "
                             f"holding {CAPTIONS_FILE}")
        return [tuple(s) for s in samples]
    from PIL import Image

    folder = Path(source)
    captions = folder / CAPTIONS_FILE
    if not captions.is_file():
        raise ValueError(f"no {CAPTIONS_FILE} in {str(folder)!r}: write one line per image, "
                         '{"image": "<file in the folder>", "caption": "<text>"}')
    samples = []
    for number, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not {"image", "caption"} <= set(record):
            raise ValueError(f"{captions}:{number} needs the keys 'image' and 'caption', got {line[:200]!r}")
        samples.append((Image.open(folder / record["image"]).convert("RGB"), str(record["caption"])))
    if not samples:
        raise ValueError(f"{captions} lists no image")
    return samples


def image_text_forward_loop(processor, samples: Union[str, Path, Sequence[CaptionedImage]], batch_size: int = 4,
                            text_loop: Optional[CalibrationLoop] = None) -> CalibrationLoop:
    """A forward loop over `text_loop`'s batches (if given), then the captioned images' batches.

    processor: the VLM's processor (`AutoProcessor.from_pretrained(model_path)`), with a chat template.
    """
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{type(processor).__name__} has no chat_template, which places the image in the prompt "
                         "for this model family; load the processor from the model's folder or set "
                         "processor.chat_template")
    samples = load_captioned_images(samples)
    batches = [_batch(processor, samples[start:start + batch_size]) for start in range(0, len(samples), batch_size)]
    text_batches = list(text_loop.batches) if text_loop is not None else []
    source = f"{len(samples)} captioned images" + (f" and {text_loop.source}" if text_loop is not None else "")
    return CalibrationLoop(text_batches + batches, source=source)


def _batch(processor, samples: Sequence[CaptionedImage]) -> dict:
    """The processor's inputs for a few captioned images, right-padded (the model computes the positions)."""
    texts = [processor.apply_chat_template(_conversation(caption), tokenize=False) for _, caption in samples]
    encoded = processor(images=[image for image, _ in samples], text=texts, padding=True, padding_side="right",
                        return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def _conversation(caption: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
