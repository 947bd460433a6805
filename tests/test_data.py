"""Data: JSONL / parquet / datasets-folder rows in the R1-V shape, image checks, prompt
rendering through the real processor, the sampler's exact resume, and bad inputs."""

import json

import pytest
import torch

from fastrft import synthetic
from fastrft.data import PromptSampler, load_image, load_rows, render_prompt
from fastrft.rollout import encode_prompts


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = synthetic.make_split(7, seed=3)
    return synthetic.write_jsonl(rows, folder, "train"), rows


def test_jsonl_rows_and_images(jsonl):
    path, made = jsonl
    rows = load_rows(str(path))
    assert len(rows) == 7
    assert [r["solution"] for r in rows] == [m["solution"] for m in made]
    im = load_image(rows[0]["images"][0])
    ref = synthetic.render(made[0]["objects"])
    assert im.size == (56, 56) and im.tobytes() == ref.tobytes()  # PNG is lossless


def test_parquet_and_datasets_folder(jsonl, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, made = jsonl
    raw = [json.loads(line) for line in open(path)]
    for r in raw:
        r["image"] = str(path.parent / r["image"])  # absolute: the parquet file lives elsewhere
        r["answer"] = r.pop("solution")  # the other accepted column name
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "d.parquet")
    rows = load_rows(str(tmp_path / "d.parquet"))
    assert [r["solution"] for r in rows] == [m["solution"] for m in made]
    datasets.Dataset.from_list(raw).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(str(tmp_path / "ds"))
    assert [r["problem"] for r in rows] == [m["problem"] for m in made]


def test_bad_inputs(tmp_path, jsonl):
    path, _ = jsonl
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        load_rows(str(empty))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "problem": "q", "solution": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: image file .*nope.png.* does not exist"):
        load_rows(str(missing))
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not a png at all")
    (tmp_path / "corrupt.jsonl").write_text(json.dumps({"image": "bad.png", "problem": "q", "solution": "a"}) + "\n")
    rows = load_rows(str(tmp_path / "corrupt.jsonl"))
    with pytest.raises(ValueError, match="corrupt.jsonl:1: cannot read image .*bad.png"):
        load_image(rows[0]["images"][0], where=rows[0].where)
    (tmp_path / "nosol.jsonl").write_text(json.dumps({"problem": "q"}) + "\n")
    with pytest.raises(ValueError, match="no solution column"):
        load_rows(str(tmp_path / "nosol.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"problem": "q", "solution": "a"}\n{"problem": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(ValueError, match="non-empty subset"):
        load_rows("shapes", tasks=["colour", "size"])


def test_prompt_through_processor_and_length_check():
    processor = synthetic.make_processor()
    rows = load_rows("shapes", split="test", size=3)
    texts = [render_prompt(processor, r) for r in rows]
    images = [[load_image(im) for im in r["images"]] for r in rows]
    batch = encode_prompts(processor, texts, images, max_prompt_length=64)
    image_id = processor.image_token_id
    for i, ids in enumerate(batch.ids):
        assert int((ids == image_id).sum()) == 4  # 56 px -> 4x4 patches -> 2x2 merged tokens
        assert batch.pixel_values[i].shape == (16, 3 * 2 * 14 * 14)
        assert batch.image_grid_thw[i].tolist() == [[1, 4, 4]]
        assert processor.tokenizer.decode(ids).endswith("<|im_start|> assistant")
    with pytest.raises(ValueError, match="prompt 0 is 1[0-9] tokens .*max_prompt_length=8"):
        encode_prompts(processor, texts, images, max_prompt_length=8)


def test_synthetic_balanced_and_disjoint():
    rows = synthetic.make_split(120, seed=0)
    for task in synthetic.TASKS:
        answers = [r["solution"] for r in rows if r["task"] == task]
        assert sorted(set(answers)) == sorted(synthetic.ANSWERS[task])
        assert all(answers.count(a) == 10 for a in synthetic.ANSWERS[task])
    for r in rows:
        if r["task"] == "count":
            assert len(r["objects"]) == int(r["solution"])
        elif r["task"] == "position":
            assert synthetic.POSITIONS[r["objects"][0]["cell"]] == r["solution"]
        else:
            assert r["objects"][0]["colour"] == r["solution"]
    train = {json.dumps(r["objects"]) + r["problem"] for r in load_rows("shapes", size=500)}
    test = [json.dumps(r["objects"]) + r["problem"] for r in load_rows("shapes", split="test", size=50)]
    assert len(test) == 50 and len(train) > 1


def test_sampler_epochs_and_resume():
    s = PromptSampler(10, seed=1)
    first = s.next(7) + s.next(7) + s.next(6)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert first[:10] != first[10:]  # a fresh permutation each epoch
    a = PromptSampler(10, seed=1)
    a.next(13)
    b = PromptSampler(10, seed=1)
    b.load_state_dict(a.state_dict())
    assert a.next(9) == b.next(9)
    with pytest.raises(ValueError, match="has 11 rows"):
        PromptSampler(11, seed=1).load_state_dict(a.state_dict())


def test_image_row_tensor_free_of_padding():
    processor = synthetic.make_processor()
    rows = load_rows("shapes", split="test", size=4)
    texts = [render_prompt(processor, r) for r in rows]
    batch = encode_prompts(processor, texts, [[load_image(im) for im in r["images"]] for r in rows], 64)
    pad = processor.tokenizer.pad_token_id
    assert all(int((ids == pad).sum()) == 0 for ids in batch.ids)
    assert torch.equal(torch.cat(batch.pixel_values), batch.inputs["pixel_values"])
