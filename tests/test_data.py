"""uniref.data: the same rows (from the synthetic world, so the answers are known) written to disk in each
dataset layout people use read back as the same records; bad rows and paths are named in one line."""

import json

import numpy as np
import PIL.Image
import pytest

from uniref.data import DatasetError, EditRecord, open_dataset

N = 5


@pytest.fixture(scope="module")
def rows():
    """Five synthetic rows with 1-3 references of different sizes, one of them without references."""
    data = open_dataset("synthetic", length=N, size=64, compose_ratio=0.6, num_refs=(2, 3), seed=4)
    out = [data[i] for i in range(N)]
    out[2] = EditRecord(out[2].id, out[2].prompt, [], out[2].target)  # a text-to-image row: no references
    return out


def _arrays(record):
    target = None if record.target is None else np.asarray(record.target_image())
    return record.prompt, target, [np.asarray(r) for r in record.reference_images()]


def _same(a, b):
    pa, ta, ra = _arrays(a)
    pb, tb, rb = _arrays(b)
    assert pa == pb and (ta is None) == (tb is None) and len(ra) == len(rb)
    assert ta is None or np.array_equal(ta, tb)
    assert all(np.array_equal(x, y) for x, y in zip(ra, rb))


def _save(folder, name, image):
    """Writes ``image`` at ``folder / name`` (folders made); returns ``name``."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return name


def write_diffsynth(root, rows, fmt):
    meta = []
    for r in rows:
        refs = [_save(root, f"img/{r.id}_ref{k}.png", img) for k, img in enumerate(r.reference_images())]
        _save(root, f"img/{r.id}.png", r.target_image())
        meta.append(
            {
                "image": f"img/{r.id}.png",
                "edit_image": refs[0] if len(refs) == 1 else refs,
                "prompt": r.prompt,
                "id": r.id,
            }
        )
    if fmt == "jsonl":
        (root / "meta.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    elif fmt == "json":
        (root / "meta.json").write_text(json.dumps(meta))
    else:
        import csv

        with open(root / "meta.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "edit_image", "prompt", "id"])
            w.writeheader()
            for m in meta:
                w.writerow(
                    {
                        **m,
                        "edit_image": json.dumps(m["edit_image"])
                        if isinstance(m["edit_image"], list)
                        else m["edit_image"],
                    }
                )
    return f"diffsynth:{root / f'meta.{fmt}'}"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_diffsynth_metadata(tmp_path, rows, fmt):
    data = open_dataset(write_diffsynth(tmp_path, rows, fmt))
    assert len(data) == N
    for a, b in zip(rows, data):
        _same(a, b)
        assert b.id == a.id


def test_musubi_folder_and_jsonl(tmp_path, rows):
    (tmp_path / "images").mkdir()
    (tmp_path / "control").mkdir()
    lines = []
    for r in rows:
        r.target_image().save(tmp_path / "images" / f"{r.id}.png")
        (tmp_path / "images" / f"{r.id}.txt").write_text(r.prompt)
        line = {"image_path": f"images/{r.id}.png", "caption": r.prompt}
        for k, img in enumerate(r.reference_images()):
            name = f"{r.id}_{k:04d}.png" if k % 2 else f"{r.id}_{k}.png"  # both numberings musubi accepts
            img.save(tmp_path / "control" / name)
            line[f"control_path_{k}"] = f"control/{name}"
        lines.append(json.dumps(line))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    folder = open_dataset(f"musubi:{tmp_path / 'images'}", root=tmp_path, keys={"control_directory": "control"})
    jsonl = open_dataset(f"musubi:{tmp_path / 'data.jsonl'}")
    by_id = {r.id: r for r in rows}
    assert sorted(r.id for r in folder) == sorted(by_id)
    for rec in folder:
        _same(by_id[rec.id], rec)
    for a, b in zip(rows, jsonl):
        _same(a, b)


def test_aitoolkit_folders(tmp_path, rows):
    for r in rows:
        _save(tmp_path / "target", f"{r.id}.png", r.target_image())
        (tmp_path / "target" / f"{r.id}.txt").write_text(r.prompt)
        for k, img in enumerate(r.reference_images()):
            _save(tmp_path / f"control{k + 1}", f"{r.id}.png", img)
    data = open_dataset(
        f"aitoolkit:{tmp_path / 'target'}", root=tmp_path, keys={"control": ["control1", "control2", "control3"]}
    )
    by_id = {r.id: r for r in rows}
    for rec in data:
        _same(by_id[rec.id], rec)


def test_hf_parquet_and_saved_dataset(tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = write_diffsynth(tmp_path, rows, "jsonl")  # images on disk; the table names them
    meta = [json.loads(x) for x in (tmp_path / "meta.jsonl").read_text().splitlines()]
    refs = [m["edit_image"] if isinstance(m["edit_image"], list) else [m["edit_image"]] for m in meta]
    table = pa.table(
        {"instruction": [m["prompt"] for m in meta], "target": [m["image"] for m in meta], "references": refs}
    )
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    keys = {"prompt": "instruction"}
    from_parquet = open_dataset(f"hf:{tmp_path / 'pq'}", root=tmp_path, keys=keys)
    # built from an Arrow table: Dataset.from_dict fails while fingerprinting with datasets 5.2 + pyarrow 26
    datasets.Dataset(table).save_to_disk(tmp_path / "saved")
    saved = open_dataset(f"hf:{tmp_path / 'saved'}", root=tmp_path, keys=keys)
    for a, b, c in zip(rows, from_parquet, saved):
        _same(a, b)
        _same(a, c)
    assert paths


def test_bad_rows_and_paths_are_named(tmp_path, rows):
    write_diffsynth(tmp_path, rows[:2], "jsonl")
    meta = tmp_path / "meta.jsonl"
    lines = meta.read_text().splitlines()
    lines.append(json.dumps({"image": "../outside.png", "edit_image": [], "prompt": "x"}))
    lines.append(json.dumps({"image": "img/none.png", "edit_image": [], "prompt": "y"}))
    lines.append(json.dumps({"image": "img/0.png", "edit_image": [], "text": "z"}))
    meta.write_text("\n".join(lines) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"meta.jsonl line 6: not JSON"):
        open_dataset(f"diffsynth:{meta}")
    meta.write_text("\n".join(lines) + "\n")
    data = open_dataset(f"diffsynth:{meta}")
    with pytest.raises(DatasetError, match=r"row 2: \.\./outside\.png is outside the data root"):
        data[2]
    with pytest.raises(DatasetError, match=r"id 3, target: .*none\.png: no such file"):
        data[3].target_image()
    with pytest.raises(DatasetError, match=r"row 4: no 'prompt' field .*set data.keys.prompt"):
        data[4]
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    assert "is empty" in str(
        pytest.raises(DatasetError, EditRecord("e", "p", [tmp_path / "img" / "empty.png"]).reference_images).value
    )
    for spec, message in [
        ("parquet:x", "must be synthetic or one of"),
        ("diffsynth:", "give a path"),
        (f"diffsynth:{tmp_path / 'nope.jsonl'}", "does not exist"),
        (f"aitoolkit:{tmp_path}", "data.keys.control"),
    ]:
        with pytest.raises(DatasetError, match=message):
            open_dataset(spec)
    with pytest.raises(DatasetError, match="data.root .* no such folder"):
        open_dataset("diffsynth:meta.jsonl", root=tmp_path / "nowhere")


def test_in_memory_images_are_rgb_with_alpha_on_white():
    rgba = PIL.Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    rec = EditRecord("a", "p", [rgba, PIL.Image.new("L", (2, 2), 7)])
    first, second = rec.reference_images()
    assert first.mode == "RGB" and first.getpixel((0, 0)) == (255, 255, 255)
    assert second.mode == "RGB" and second.getpixel((1, 1)) == (7, 7, 7)
    target, refs = EditRecord("b", "p", [rgba], PIL.Image.new("RGB", (5, 6))).tensors()
    assert target.shape == (3, 6, 5) and refs[0].shape == (3, 3, 4)


def test_check_reports_the_summary_and_every_bad_row(tmp_path, rows):
    from uniref.data import check_dataset

    write_diffsynth(tmp_path, rows, "jsonl")
    meta = tmp_path / "meta.jsonl"
    lines = meta.read_text().splitlines()
    (tmp_path / "img" / "zero.png").write_bytes(b"")
    (tmp_path / "img" / "cut.png").write_bytes((tmp_path / "img" / "0.png").read_bytes()[:60])
    lines += [
        json.dumps({"image": "img/0.png", "edit_image": ["img/zero.png"], "prompt": "a"}),
        json.dumps({"image": "img/0.png", "edit_image": ["img/cut.png"], "prompt": "b"}),
        json.dumps({"image": "img/0.png", "edit_image": [], "prompt": " "}),
        json.dumps({"edit_image": ["img/0.png"], "prompt": "no target"}),
    ]
    meta.write_text("\n".join(lines) + "\n")
    report = check_dataset(f"diffsynth:{meta}", pixel_budgets=[4096, 16384], multiple=8)
    assert report.rows == N + 4 and [row for row, _ in report.bad] == [5, 6, 7, 8]
    reasons = [reason for _, reason in report.bad]
    assert "is empty" in reasons[0] and "cut.png" in reasons[1] and "empty prompt" in reasons[2]
    assert "no target image" in reasons[3]
    assert sum(report.references.values()) == N and report.references[0] == 1  # the text-to-image row
    text = report.format()
    assert f"{N + 4} rows, {N} readable, 4 bad" in text and "(per_image)" in text and "bad row 8:" in text
    self_tokens, per_image = report.tokens[(16384, "global")], report.tokens[(16384, "per_image")]
    assert max(self_tokens) <= 16384 // 64 + 64 // 8 * 64 // 8  # SELF: the budget bounds the references
    assert sum(per_image) > sum(self_tokens)
    assert not check_dataset(f"diffsynth:{meta}", require_target=False).bad[3:]


def test_data_check_command(tmp_path, rows):
    import subprocess
    import sys

    spec = write_diffsynth(tmp_path, rows, "jsonl")
    cmd = [sys.executable, "-m", "uniref.cli", "data", "check", spec, "--pixel-budget", "4096", "--multiple", "8"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and f"{N} rows, {N} readable, 0 bad" in ok.stdout and "at 4096 px (global)" in ok.stdout
    (tmp_path / "meta.jsonl").write_text((tmp_path / "meta.jsonl").read_text() + '{"image": "x.png", "prompt": "p"}\n')
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bad row 5:" in bad.stdout and "x.png: no such file" in bad.stdout
    missing = subprocess.run(cmd[:5] + ["diffsynth:nope.jsonl"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("uniref data check: ")
