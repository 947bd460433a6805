"""The embedded default: a synthetic visual-reasoning task, a tokenizer and a tiny model, all
built in code (no download), so `bash scripts/train.sh` runs a real GRPO job anywhere.

- Images: a 2x2 grid of cells (28 px each at the default 56 px) holding shapes (square,
  circle, triangle, cross), each in its own cell and colour, drawn with PIL: one shape for
  colour and position questions, 1 to 4 of distinct kinds for count questions. The Qwen2-VL
  image processor turns a 56 px image into 4x4 patches of 14 px and merges 2x2 of them into
  one LM token, so each of the 4 image tokens sees one cell.
- Questions, each with a one-word answer that the `shapes` reward (`fastrft.rewards`) checks
  exactly (4 options each, chance 0.25): "what colour is the circle ?" (red/green/blue/yellow),
  "how many shapes are there ?" (1-4), "where is the circle ?" (top-left/top-right/
  bottom-left/bottom-right).
- Rows are generated from a seed and balanced by construction: row i asks task i mod 3 and
  its answer cycles through the 4 options, so every batch of 12 consecutive rows holds
  every (task, answer) pair once. The held-out split uses another seed.
- A word-level tokenizer (`tokenizers` WordLevel, whitespace split) wrapped in
  `PreTrainedTokenizerFast`, a `Qwen2VLImageProcessorPil` configured for 56 px images and a
  `Qwen2_5_VLProcessor` with a chat template (`fastrft.models.image_text_processor`): the
  same processor pipeline as a real Qwen2.5-VL.
- A tiny Qwen2.5-VL (text: hidden 128, 2 layers; vision: hidden 64, depth 2), randomly
  initialised from a seed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .models import image_text_processor

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle", "cross")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNTS = ("1", "2", "3", "4")
TASKS = ("colour", "count", "position")
ANSWERS = {"colour": tuple(COLOURS), "count": COUNTS, "position": POSITIONS}

SPECIAL_TOKENS = [
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # eos
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
EOS_ID = SPECIAL_TOKENS.index("<|im_end|>")  # the tiny tokenizer's eos (ids are list positions)
WORDS = [
    "user", "assistant", "system", "what", "colour", "is", "the", "how", "many", "shapes", "are",
    "there", "where", "?", "answer", ":", "<think>", "</think>", "<answer>", "</answer>",
    *COLOURS, *SHAPES, *POSITIONS, "0", *COUNTS, "5", "6", "7", "8", "9",
]  # fmt: skip

# Renders {"role", "content": str | [{"type": "image"} | {"type": "text", "text"}]} messages
# the way Qwen2-VL's template does, with spaces between words for the whitespace tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the task's vocabulary (~50 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:7],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    return tok


def make_processor(image_size: int = 56):
    """A `Qwen2_5_VLProcessor` with the word tokenizer and a Qwen2-VL image processor that keeps
    `image_size` px images at that size (image_size must be a multiple of 28)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}")
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    return image_text_processor(image_processor, make_tokenizer(), CHAT_TEMPLATE)


def make_model_config(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, vision_hidden_size: int = 64):
    """A tiny Qwen2.5-VL config over `tokenizer`'s vocabulary."""
    from transformers import Qwen2_5_VLConfig

    heads = 4
    head_dim = hidden_size // heads  # 32: mrope_section splits its 16 frequencies over (t, h, w)
    section = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision_config = dict(
        depth=2,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=4,
        out_hidden_size=hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        initializer_range=0.1,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def make_model(processor, seed: int = 0, **sizes):
    """A randomly initialised tiny `Qwen2_5_VLForConditionalGeneration` (seeded)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = make_model_config(processor.tokenizer, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = config.get_text_config()  # transformers < 5.20 keeps eos/pad on the text config only
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    return model


def save_tiny(path: str | os.PathLike, seed: int = 0, image_size: int = 56) -> Path:
    """Writes the tiny model and its processor to `path` with `save_pretrained` (a local model
    folder any transformers loader reads; tests use it for the load-from-path route)."""
    path = Path(path)
    processor = make_processor(image_size)
    make_model(processor, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- images and rows


def draw_shape(draw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "cross":
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx + w // 2, y1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1, cy + w // 2), fill=fill)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {kind!r}")


def render(objects: list[dict], image_size: int = 56):
    """A PIL image: each object {"shape", "colour", "cell" (0..3, row-major)} drawn in its cell."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = image_size // 2
    margin = max(2, cell // 7)  # 4 px at 28 px cells: shapes never touch a cell border
    for obj in objects:
        r, c = divmod(obj["cell"], 2)
        box = (c * cell + margin, r * cell + margin, (c + 1) * cell - margin - 1, (r + 1) * cell - margin - 1)
        draw_shape(draw, obj["shape"], box, COLOURS[obj["colour"]])
    return img


def make_row(index: int, rng: random.Random, tasks=TASKS) -> dict:
    """One balanced row: task `tasks[index % len(tasks)]`, answer cycling through its options."""
    task = tasks[index % len(tasks)]
    answer = ANSWERS[task][(index // len(tasks)) % 4]
    # colour and position questions show one shape; count questions 1 to 4 (distinct kinds).
    # With several shapes a colour question needs shape-colour binding, which the tiny random
    # ViT did not learn by RL alone in 600 steps (train accuracy stayed ~0.3).
    n = int(answer) if task == "count" else 1
    cells = rng.sample(range(4), n)
    kinds = rng.sample(SHAPES, n)
    colours = [rng.choice(tuple(COLOURS)) for _ in range(n)]
    target = 0  # the object the question is about
    if task == "colour":
        colours[target] = answer
        problem = f"what colour is the {kinds[target]} ?"
    elif task == "position":
        cells[target] = POSITIONS.index(answer)
        problem = f"where is the {kinds[target]} ?"
    else:
        problem = "how many shapes are there ?"
    objects = [{"shape": k, "colour": col, "cell": c} for k, col, c in zip(kinds, colours, cells)]
    return {"task": task, "problem": problem, "solution": answer, "objects": objects}


def make_split(n: int, seed: int, tasks=TASKS) -> list[dict]:
    """`n` rows (each with its objects; images are rendered on use), generated from `seed`."""
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"synthetic tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    rng = random.Random(seed)
    return [make_row(i, rng, tuple(tasks)) for i in range(n)]


def write_jsonl(rows: list[dict], folder: str | os.PathLike, name: str, image_size: int = 56) -> Path:
    """Writes `rows` as `<folder>/<name>.jsonl` in the R1-V shape ({"image", "problem",
    "solution"}) with PNG images beside it: the synthetic data as a user's dataset would be."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            image = f"images/{name}-{i:05d}.png"
            render(row["objects"], image_size).save(folder / image)
            f.write(json.dumps({"image": image, "problem": row["problem"], "solution": row["solution"]}) + "\n")
    return path


if __name__ == "__main__":  # python -m fastrft.synthetic [FOLDER]: the shapes data as a user's files
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "data"
    for name, n, seed in (("train", 512, 0), ("test", 64, 1_000_003)):
        print(write_jsonl(make_split(n, seed, ("colour",)), out, name))
