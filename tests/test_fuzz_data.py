"""Fuzzing the data loader (hypothesis): rows with wrong types, missing keys, bad image paths
and bytes, huge strings, non-UTF-8 and broken JSON lines. Every input either loads rows that
are what the file says (problem text, solution, images that exist) or raises a ValueError
that names the file, the line and (for a bad field) the field; never another exception,
never a silently different row."""

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastrft.data import PROBLEM_KEYS, SOLUTION_KEYS, load_image, load_rows

COUNT = {"inputs": 0}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False),
                         st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
keys = st.sampled_from(["problem", "prompt", "question", "solution", "answer", "image", "images", "extra", ""])
rows = st.dictionaries(keys, json_values, max_size=6)


def _valid_or_named_error(path, n_lines, field_values):
    """load_rows(path): rows, or a ValueError naming the file and a line in it."""
    COUNT["inputs"] += 1
    try:
        return load_rows(str(path))
    except ValueError as e:
        msg = str(e)
        assert str(path) in msg, msg
        if "has no rows" not in msg:
            line = msg.split(str(path), 1)[1]
            assert line.startswith(":") and int(line[1:].split(":")[0]) in range(1, n_lines + 1), msg
        return None


def _image(tmp_path):
    from PIL import Image

    p = tmp_path / "ok.png"
    if not p.exists():
        Image.new("RGB", (8, 8), "red").save(p)
    return p


@SETTINGS
@given(st.lists(st.one_of(rows, json_values), min_size=1, max_size=5))
def test_fuzz_jsonl_rows(tmp_path, items):
    img = _image(tmp_path)
    path = tmp_path / "data.jsonl"
    lines = []
    for it in items:
        if isinstance(it, dict) and it.get("image") == "OK":
            it["image"] = img.name
        lines.append(json.dumps(it))
    path.write_text("\n".join(lines) + "\n")
    got = _valid_or_named_error(path, len(lines), items)
    if got is None:
        return
    assert len(got) == len(items)  # no row dropped or invented
    for row, raw in zip(got, items):
        assert isinstance(raw, dict)
        problem = next(raw[k] for k in PROBLEM_KEYS if raw.get(k) is not None)
        solution = next(raw[k] for k in SOLUTION_KEYS if raw.get(k) is not None)
        assert row["problem"] == problem and isinstance(row["problem"], str)  # text as it was, never str(dict)
        assert row["solution"] == solution and not isinstance(solution, (dict, bool))
        assert all(os.path.isfile(p) for p in row["images"])


@SETTINGS
@given(st.binary(min_size=1, max_size=200), st.integers(0, 3))
def test_fuzz_raw_bytes_lines(tmp_path, junk, at):
    """Arbitrary bytes (invalid UTF-8, NUL, lone \\r, broken JSON) on one line among good ones."""
    good = json.dumps({"problem": "2+2?", "solution": "4"}).encode()
    lines = [good] * 4
    lines[at] = junk.replace(b"\n", b" ")
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = _valid_or_named_error(path, 4, None)
    if got is not None:  # the junk was a valid row (or blank): the good rows all came through unchanged
        assert sum(r["problem"] == "2+2?" and r["solution"] == "4" for r in got) >= 3


@pytest.mark.parametrize(
    "line, match",
    [
        (b'{"problem": "q", "solution": "\xff\xfe"}', r"data.jsonl:2: not UTF-8 text \(byte 0xff at column 31\)"),
        (b'{"problem": "q", "solution": ', r"data.jsonl:2: not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, r"data.jsonl:2: .*(nested too deeply|not valid JSON)"),
        (b'{"problem": {"text": "q"}, "solution": "a"}', r"data.jsonl:2: field 'problem' must be text, got dict"),
        (b'{"question": ["q"], "solution": "a"}', r"data.jsonl:2: field 'question' must be text, got list"),
        (b'{"problem": "q", "solution": {"a": 1}}', r"data.jsonl:2: field 'solution' must be text, a number"),
        (b'{"problem": "q", "answer": true}', r"data.jsonl:2: field 'answer' must be text, a number"),
        (b'{"problem": "q", "solution": [1, {"x": 2}]}', r"data.jsonl:2: field 'solution\[\]'"),
        (b'{"problem": "q"}', r"data.jsonl:2: no solution column"),
        (b'{"solution": "a"}', r"data.jsonl:2: no problem column"),
        (b'"just a string"', r"data.jsonl:2: the row is str, expected an object"),
        (b'{"problem": "q", "solution": "a", "image": 7}', r"data.jsonl:2: field 'image' must hold image paths"),
        (b'{"problem": "q", "solution": "a", "images": [["x.png"]]}', r"data.jsonl:2: field 'images' must hold"),
        (b'{"problem": "q", "solution": "a", "image": "nope.png"}', r"data.jsonl:2: image file .*nope.png.* does not exist"),
        (b'{"problem": "q", "solution": "a", "image": "a\\u0000b"}', r"data.jsonl:2: field 'image': .* is not a file path"),
        (b'{"problem": "q", "solution": "a", "image": ""}', r"data.jsonl:2: field 'image': .* is not a file path"),
        (b'{"problem": "q", "solution": "a", "image": {"bytes": 5}}', r"data.jsonl:2: field 'image': an image's 'bytes'"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, match):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps({"problem": "ok", "solution": "1"}).encode() + b"\n" + line + b"\n")
    COUNT["inputs"] += 1
    with pytest.raises(ValueError, match=match):
        load_rows(str(path))


def test_huge_strings_load_as_they_are(tmp_path):
    big = "x" * (8 << 20)  # 8 MB of problem text: loaded as is (the prompt length check comes later, by tokens)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"problem": big, "solution": "y" * 100_000}) + "\n")
    (row,) = load_rows(str(path))
    COUNT["inputs"] += 1
    assert row["problem"] == big and len(row["solution"]) == 100_000


def test_json_file_errors_name_the_file(tmp_path):
    for data, match in ((b'[{"problem": "q", "solution": "a"},\n {"problem": "\xc3("}]', r"d.json:2: not UTF-8"),
                        (b'[{"problem": "q"', r"d.json: not valid JSON"), (b'{"problem": "q"}', r"d.json: expected a JSON list")):
        (tmp_path / "d.json").write_bytes(data)
        COUNT["inputs"] += 1
        with pytest.raises(ValueError, match=match):
            load_rows(str(tmp_path / "d.json"))


@SETTINGS
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_image_bytes_and_files(tmp_path, data, as_file):
    """Bad image bytes (random, or a real PNG cut short / corrupted) fail with a ValueError that
    names the row, never with a PIL or OS error."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(buf, format="PNG")
    png = buf.getvalue()
    candidates = [data, png[: len(data) % len(png)], png[:40] + data]
    for blob in candidates:
        COUNT["inputs"] += 1
        if as_file:
            p = tmp_path / "img.png"
            p.write_bytes(blob)
            image = str(p)
        else:
            image = {"bytes": blob}
        try:
            im = load_image(image, where="data.jsonl:3")
        except ValueError as e:
            assert "data.jsonl:3: cannot read" in str(e)
        else:
            assert im.mode == "RGB" and im.size[0] > 0


def test_report_count():
    print(f"data-loader inputs tried so far in this process: {COUNT['inputs']}")
