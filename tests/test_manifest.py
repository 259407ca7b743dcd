"""The JSONL manifest: valid files round-trip, every rule violation names its line and field."""

import json
from pathlib import Path

import pytest

from hcustom_mc.data.manifest import ManifestEntry, ManifestError, Subject, load_manifest, write_manifest


def line(**overrides):
    """A valid identity line; keyword None removes the key, anything else replaces it."""
    obj = {
        "id": "s0000", "task": "identity", "video": "videos/s0000.mp4", "caption": "A red square moves right.",
        "subjects": [{"name": "square", "image": "images/s0000_0.png"}],
        "audio": None, "source_video": None, "mask_video": None,
    }
    for k, v in overrides.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    return obj


def write_lines(tmp_path, *objs, name="manifest.jsonl"):
    path = tmp_path / name
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def valid_objects():
    return [
        {"id": "t", "task": "t2v", "video": "v/t.mp4", "caption": "A cat.", "height": 48, "width": 64,
         "num_frames": 17, "fps": 25.0},
        line(id="i", subjects=[{"name": "sq", "image": "img/i.png", "box": [1, 2, 30, 40], "mask": "img/i_m.png"}]),
        line(id="m", task="multi_identity",
             subjects=[{"name": "a", "image": "img/a.png"}, {"name": "b", "image": "/abs/b.png"}]),
        line(id="a", task="audio", audio="audio/a.wav"),
        line(id="e", task="editing", subjects=[], source_video="v/src.mp4", mask_video="v/mask.mp4"),
    ]


def test_valid_manifest_loads_with_absolute_paths_and_round_trips(tmp_path):
    path = write_lines(tmp_path, "# comment", "", *valid_objects()[:2], "   ", "  # indented comment",
                       *valid_objects()[2:])
    entries = load_manifest(path)
    assert [e.id for e in entries] == ["t", "i", "m", "a", "e"]
    assert [e.line for e in entries] == [3, 4, 7, 8, 9]
    t, i, m, a, e = entries
    assert t.video == tmp_path / "v/t.mp4" and t.subjects == ()
    assert (t.height, t.width, t.num_frames, t.fps) == (48, 64, 17, 25.0)
    assert i.subjects == (Subject("sq", tmp_path / "img/i.png", (1.0, 2.0, 30.0, 40.0), tmp_path / "img/i_m.png"),)
    assert i.height is None and i.fps is None  # absent metadata: probed later
    assert m.subjects[1].image == Path("/abs/b.png")
    assert a.audio == tmp_path / "audio/a.wav"
    assert (e.source_video, e.mask_video) == (tmp_path / "v/src.mp4", tmp_path / "v/mask.mp4")
    assert all(p.is_absolute() for p in (t.video, i.subjects[0].image, a.audio))

    # Same folder and another folder: paths are re-relativised, the entries come back equal.
    for out in (tmp_path / "copy.jsonl", tmp_path / "elsewhere" / "deeper" / "copy.jsonl"):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_manifest(entries, out)
        assert load_manifest(out) == entries
    written = json.loads((tmp_path / "copy.jsonl").read_text().splitlines()[1])
    assert written["video"] == "videos/s0000.mp4" and written["subjects"][0]["image"] == "img/i.png"
    assert "height" not in written  # unknown metadata is left absent, not written as null


def test_write_manifest_from_code(tmp_path):
    entry = ManifestEntry(id="x", task="t2v", video=tmp_path / "x.mp4", caption="A dog.")
    write_manifest([entry], tmp_path / "m.jsonl")
    assert load_manifest(tmp_path / "m.jsonl") == [entry]


# (overrides on the valid identity line, field the error must name, text the message must contain)
VIOLATIONS = [
    (dict(task="t2v"), "subjects", "no subjects"),
    (dict(task="identity", subjects=[]), "subjects", "exactly 1 subject"),
    (dict(subjects=[{"name": "a", "image": "a.png"}, {"name": "b", "image": "b.png"}]), "subjects", "exactly 1"),
    (dict(task="multi_identity"), "subjects", "at least 2 subjects"),
    (dict(task="audio"), "audio", "missing (required)"),
    (dict(task="audio", audio="a.wav", subjects=[]), "subjects", "at least 1 subject"),
    (dict(task="editing", mask_video="m.mp4"), "source_video", "missing (required)"),
    (dict(task="editing", source_video="s.mp4"), "mask_video", "missing (required)"),
    (dict(audio="a.wav"), "audio", "only used by task 'audio'"),
    (dict(task="dance"), "task", "unknown task 'dance'"),
    (dict(task="identiy"), "task", "did you mean 'identity'"),
    (dict(task=None), "task", "missing (required)"),
    (dict(id=None), "id", "missing (required)"),
    (dict(id=7), "id", "non-empty string"),
    (dict(video=None), "video", "missing (required)"),
    (dict(video=""), "video", "non-empty string"),
    (dict(caption=None), "caption", "missing (required)"),
    (dict(caption="   "), "caption", "non-empty string"),
    (dict(caption=["a"]), "caption", "non-empty string"),
    (dict(captions="typo"), "captions", "did you mean 'caption'"),
    (dict(subjects={"name": "a"}), "subjects", "must be a list"),
    (dict(subjects=["a.png"]), "subjects[0]", "must be an object"),
    (dict(subjects=[{"name": "a"}]), "subjects[0].image", "missing (required)"),
    (dict(subjects=[{"image": "a.png"}]), "subjects[0].name", "missing (required)"),
    (dict(subjects=[{"name": "a", "image": "a.png", "bbox": [0, 0, 1, 1]}]), "subjects[0].bbox", "did you mean 'box'"),
    (dict(subjects=[{"name": "a", "image": "a.png", "box": [0, 0, 1]}]), "subjects[0].box", "4 numbers"),
    (dict(subjects=[{"name": "a", "image": "a.png", "box": [5, 0, 1, 1]}]), "subjects[0].box", "x0 < x1"),
    (dict(height=0), "height", "positive integer"),
    (dict(width=64.0), "width", "positive integer"),
    (dict(num_frames=True), "num_frames", "positive integer"),
    (dict(fps="25"), "fps", "positive number"),
]


@pytest.mark.parametrize("overrides,field,text", VIOLATIONS, ids=[f"{v[1]}-{i}" for i, v in enumerate(VIOLATIONS)])
def test_each_rule_violation_names_line_and_field(tmp_path, overrides, field, text):
    path = write_lines(tmp_path, "# header", line(id="ok"), line(**{"id": "bad", **overrides}))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert f"{path}:3: field '{field}'" in message, message
    assert text in message, message
    assert ":2:" not in message  # the valid line is not blamed


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path, line(id="a"), line(id="b"), line(id="a"))
    with pytest.raises(ManifestError, match=r"manifest.jsonl:3: field 'id': duplicate id 'a' \(first used on line 1\)"):
        load_manifest(path)


def test_malformed_json_and_non_objects_name_the_line(tmp_path):
    path = write_lines(tmp_path, line(id="a"), '{"id": "b", "task": ', "[1, 2]", line(id="c"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}:2: malformed JSON" in str(err.value)
    assert f"{path}:3: each line must be a JSON object {{...}}, got [1, 2]" in str(err.value)
    assert len(err.value.problems) == 2


def test_all_problems_collected_and_capped(tmp_path):
    path = write_lines(tmp_path, *[line(id=f"x{i}", caption="") for i in range(30)], line(id="y", task="nope"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert len(err.value.problems) == 31  # every problem is kept on the exception
    assert "31 problem(s)" in str(err.value) and "... and 11 more" in str(err.value)
    assert str(err.value).count("field 'caption'") == 20


def test_several_problems_on_one_line_are_all_reported(tmp_path):
    path = write_lines(tmp_path, line(task="multi_identity", caption="", fps=-1, extra=1))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    fields = {p.split("field '")[1].split("'")[0] for p in err.value.problems}
    assert fields == {"caption", "fps", "extra", "subjects"}


def test_empty_manifest_and_bad_encoding(tmp_path):
    with pytest.raises(ManifestError, match="no samples"):
        load_manifest(write_lines(tmp_path, "# only a comment", ""))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(line()).encode() + b"\n" + b'{"caption": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"latin1.jsonl:2: not UTF-8"):
        load_manifest(bad)
