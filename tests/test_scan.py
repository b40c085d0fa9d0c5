"""``detector-scan`` for real: the default bundle over the digits test split and over a folder of image
files, in JSON Lines and Parquet, resumed after a process is killed mid-scan, and under torchrun with
two processes (gloo).  Every image must come out exactly once, with the service's own verdict."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import BIN, torchrun
from PIL import Image

from detector import load_bundle, load_dataset
from training.scan import main


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scan_a_dataset_split(default_bundle, tmp_path, capsys):
    out = tmp_path / "scan.jsonl"
    assert main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(out), "--batch-size", "100",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = rows_of(out)
    test = load_dataset("digits", train=False)
    assert [r["index"] for r in rows] == [r["position"] for r in rows] == list(range(len(test)))
    assert set(rows[0]) == {"index", "position", "label", "class_name", "confidence", "adversarial",
                            "adversarial_score", "uncanny_valley", "relative_sharpness"}
    # The same verdict as the service's call on the same images.
    bundle = load_bundle(default_bundle)
    x, _ = test.batch(slice(0, 50))
    answer = bundle.detect(x)
    assert [r["label"] for r in rows[:50]] == answer.labels.tolist()
    assert [r["adversarial"] for r in rows[:50]] == answer.adversarial.tolist()
    np.testing.assert_allclose([r["adversarial_score"] for r in rows[:50]], answer.adversarial_score, rtol=1e-6)
    flagged = sum(r["adversarial"] for r in rows)
    assert f"{flagged} flagged adversarial" in printed and "class" in printed
    assert not (tmp_path / "scan.jsonl.parts").exists()
    # An existing result is never overwritten.
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(out), "--no-progress"])
    assert stop.value.code == 2 and "nothing was overwritten" in capsys.readouterr().err
    # Parquet, where pyarrow is installed: the same rows.
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(tmp_path / "scan.parquet"),
                 "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "scan.parquet").to_pylist()
    assert table == [{**row, "error": None} for row in rows]  # Parquet has every column, null where unused


def _write_folder(root: Path, test) -> list[str]:
    """Uploads as they come: PNG and JPEG, other sizes and modes, a nested folder, a broken file."""
    names = []
    for i in range(30):
        sub = root / ("batch-a" if i % 2 else "batch-b/deeper")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(test.images[i, 0].numpy())
        if i % 3 == 0:
            img = img.resize((32, 32), Image.NEAREST).convert("RGB")
        name = sub / f"img{i:03d}.{'jpg' if i % 5 == 0 else 'png'}"
        img.save(name, quality=95) if name.suffix == ".jpg" else img.save(name)
        names.append(name.relative_to(root).as_posix())
    (root / "batch-a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image, not scanned")
    return sorted(names + ["batch-a/broken.png"])


def test_scan_a_folder_of_uploads(default_bundle, tmp_path, capsys):
    test = load_dataset("digits", train=False)
    names = _write_folder(tmp_path / "uploads", test)
    out = tmp_path / "uploads.jsonl"
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{tmp_path / 'uploads'}", "--out", str(out),
                 "--batch-size", "7", "--no-progress"]) == 0
    rows = rows_of(out)
    assert [r["path"] for r in rows] == names
    broken = [r for r in rows if "error" in r]
    assert [r["path"] for r in broken] == ["batch-a/broken.png"]
    assert "1 unreadable" in capsys.readouterr().out
    # Parquet keeps every column, also when the first file in scan order is the unreadable one.
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "uploads" / "0-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{tmp_path / 'uploads'}", "--out",
                 str(tmp_path / "uploads.parquet"), "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "uploads.parquet")
    assert set(table.column_names) == {"index", "path", "label", "class_name", "confidence", "adversarial",
                                       "adversarial_score", "uncanny_valley", "relative_sharpness", "error"}
    parquet_rows = table.to_pylist()
    assert parquet_rows[0]["path"] == "0-broken.jpg" and parquet_rows[0]["error"]
    assert parquet_rows[0]["label"] is None
    by_path = {r["path"]: r for r in parquet_rows}
    for row in rows:  # other batches than the JSON run: floats agree to rounding
        other = {k: v for k, v in by_path[row["path"]].items() if v is not None and k != "index"}
        assert other.keys() == row.keys() - {"index"}
        for key, value in other.items():
            # Float32 convolutions round differently at another batch size (by CPU), and the detector's
            # logistic score carries that up to ~1e-4 relative in its tails.
            assert value == (pytest.approx(row[key], rel=1e-3, abs=1e-6) if isinstance(value, float) else row[key])
    # An 8×8 PNG scores as that digit does in the dataset.
    bundle = load_bundle(default_bundle)
    x, _ = test.batch(slice(1, 2))
    row = next(r for r in rows if r["path"] == "batch-a/img001.png")
    assert row["label"] == int(bundle.detect(x).labels[0])


def _wait_for_rows(parts: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(parts.glob("rank*.jsonl")) if parts.is_dir() else []
        if sum(f.read_bytes().count(b"\n") for f in files) >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"the scan ended (rc {proc.returncode}) before it was interrupted")
        time.sleep(0.05)
    pytest.fail("the scan wrote no rows in time")


def test_scan_resumes_after_a_kill(default_bundle, tmp_path):
    """A scan killed with SIGKILL mid-write is finished by a rerun: every image once, none lost."""
    out = tmp_path / "scan.jsonl"
    command = [str(BIN / "detector-scan"), "--bundle", str(default_bundle), "--data", "digits", "--out", str(out),
               "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_rows(tmp_path / "scan.jsonl.parts", 40, proc)
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-scan, as a crash or an OOM kill would stop it
        proc.communicate(timeout=60)
    assert not out.exists()
    partial = (tmp_path / "scan.jsonl.parts" / "rank0.jsonl").read_bytes()
    scored_before = partial.count(b"\n")
    assert 40 <= scored_before < 449
    with open(tmp_path / "scan.jsonl.parts" / "rank0.jsonl", "ab") as f:
        f.write(b'{"position": 448, "label": 3, "cla')  # what a kill during a write leaves
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming: {scored_before} of 449 images already scored, {449 - scored_before} to go" in done.stderr
    rows = rows_of(out)
    assert [r["position"] for r in rows] == list(range(449))
    assert not (tmp_path / "scan.jsonl.parts").exists()
    # The same rows as an uninterrupted scan.
    assert main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(tmp_path / "whole.jsonl"),
                 "--batch-size", "8", "--no-progress"]) == 0
    whole = rows_of(tmp_path / "whole.jsonl")
    assert [r["label"] for r in rows] == [r["label"] for r in whole]
    assert [r["adversarial"] for r in rows] == [r["adversarial"] for r in whole]


def test_scan_stops_cleanly_on_sigterm(default_bundle, tmp_path):
    """An orchestrator's SIGTERM ends the scan as Ctrl-C does: exit 130, the rows so far kept, a rerun hint."""
    out = tmp_path / "scan.jsonl"
    command = [str(BIN / "detector-scan"), "--bundle", str(default_bundle), "--data", "digits", "--out", str(out),
               "--batch-size", "8", "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(tmp_path / "scan.jsonl.parts", 16, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; rerun detector-scan" in err, err[-2000:]
    assert (tmp_path / "scan.jsonl.parts" / "rank0.jsonl").read_bytes().count(b"\n") >= 16 and not out.exists()


def test_scan_under_torchrun(default_bundle, tmp_path):
    """Two ranks, each its share, one complete file: every image exactly once, as one process scores it."""
    test = load_dataset("digits", train=False)
    names = _write_folder(tmp_path / "uploads", test)
    out = tmp_path / "two.jsonl"
    done = torchrun(str(BIN / "detector-scan"), "--bundle", str(default_bundle), "--data",
                    f"folder:{tmp_path / 'uploads'}", "--out", str(out), "--batch-size", "4", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stderr and done.stdout.count("written to") == 1
    rows = rows_of(out)
    assert [r["path"] for r in rows] == names and [r["index"] for r in rows] == list(range(len(names)))
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{tmp_path / 'uploads'}", "--out",
                 str(tmp_path / "one.jsonl"), "--no-progress"]) == 0
    one = rows_of(tmp_path / "one.jsonl")
    assert [r.get("label") for r in rows] == [r.get("label") for r in one]
    np.testing.assert_allclose([r.get("adversarial_score", -1) for r in rows],
                               [r.get("adversarial_score", -1) for r in one], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl", "uploads"]


def test_scan_every_dataset_kind(default_bundle, tmp_path, fake_cifar10, capsys):
    """npz: and the train split read as digits are; CIFAR (torchvision's on-disk format) is read, and
    refused with what does not fit: its 3×32×32 images against the bundle's 1×8×8."""
    test = load_dataset("digits", train=False)
    folder = tmp_path / "npz"
    folder.mkdir()
    for split in ("train", "test"):
        np.savez(folder / f"digits_{split}.npz", x=test.images[:60, 0].numpy(), y=test.labels[:60].numpy())
    assert main(["--bundle", str(default_bundle), "--data", f"npz:{folder}", "--out", str(tmp_path / "npz.jsonl"),
                 "--no-progress"]) == 0
    npz_rows = rows_of(tmp_path / "npz.jsonl")
    assert main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(tmp_path / "d.jsonl"),
                 "--no-progress"]) == 0
    dataset_rows = rows_of(tmp_path / "d.jsonl")[:60]
    assert [r["label"] for r in npz_rows] == [r["label"] for r in dataset_rows]
    assert main(["--bundle", str(default_bundle), "--data", "digits", "--split", "train", "--out",
                 str(tmp_path / "train.jsonl"), "--no-progress"]) == 0
    assert len(rows_of(tmp_path / "train.jsonl")) == len(load_dataset("digits", train=True))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", "cifar10", "--data-dir", str(fake_cifar10), "--out",
              str(tmp_path / "c.jsonl"), "--no-progress"])
    assert stop.value.code == 2 and "(3, 32, 32)" in capsys.readouterr().err


def test_scan_resumes_only_the_same_scan(default_bundle, tmp_path, capsys):
    """Rows left by a scan of another bundle or split are never mixed in; a file that could not be read
    is tried again on resume."""
    out = tmp_path / "scan.jsonl"
    parts = tmp_path / "scan.jsonl.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"bundle_sha256": "0" * 64, "data": "digits", "split": "test",
                                                     "format": "jsonl"}))
    (parts / "rank0.jsonl").write_text(json.dumps({"position": 0, "label": 1}) + "\n")
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(out), "--no-progress"])
    assert stop.value.code == 2 and "another scan" in capsys.readouterr().err
    assert (parts / "rank0.jsonl").is_file() and not out.exists()  # nothing lost, nothing written

    uploads = tmp_path / "uploads"
    names = _write_folder(uploads, load_dataset("digits", train=False))
    sha = load_bundle(default_bundle).sha256
    (parts / "manifest.json").write_text(json.dumps({"bundle_sha256": sha, "data": f"folder:{uploads}",
                                                     "split": None, "format": "jsonl"}))
    (parts / "rank0.jsonl").write_text(json.dumps({"path": names[1], "error": "OSError: still uploading"}) + "\n")
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(out),
                 "--no-progress"]) == 0
    assert "1 unreadable before, tried again" in capsys.readouterr().err
    rows = {r["path"]: r for r in rows_of(out)}
    assert len(rows) == len(names) and "error" not in rows[names[1]] and "label" in rows[names[1]]


def test_scan_refuses_what_it_cannot_do(default_bundle, tmp_path, capsys):
    for args, message in (
        (["--data", "folder:" + str(tmp_path / "absent")], "no folder"),
        (["--data", "cifar10", "--data-dir", str(tmp_path)], "not found"),
        (["--data", "digits", "--batch-size", "0"], "batch-size"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["--bundle", str(default_bundle), "--out", str(tmp_path / "x.jsonl"), "--no-progress", *args])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err, args
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--out", str(tmp_path / "x.parquet"), "--format", "jsonl",
              "--data", "digits", "--no-progress"])
    assert stop.value.code == 2 and "disagree" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--bundle", str(default_bundle), "--out", str(tmp_path / "y.jsonl"), "--data",
              f"folder:{tmp_path / 'empty'}", "--no-progress"])
    assert "nothing to scan" in capsys.readouterr().err
    assert not any(p.suffix == ".jsonl" for p in tmp_path.iterdir())


def test_scan_never_deletes_a_folder_it_did_not_make(default_bundle, tmp_path, capsys):
    """The rows live in ``<out>.parts/`` and that folder goes when the scan ends: a folder of the user's at
    that path (the scanned one, or any other) is refused and left whole."""
    uploads = tmp_path / "store.parts"
    names = _write_folder(uploads, load_dataset("digits", train=False))
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(tmp_path / "store"),
              "--no-progress"])
    assert stop.value.code == 2 and "scanned folder" in capsys.readouterr().err
    (tmp_path / "mine.jsonl.parts").mkdir()
    (tmp_path / "mine.jsonl.parts" / "thesis.tex").write_text("months of work")
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(tmp_path / "mine.jsonl"),
              "--no-progress"])
    assert stop.value.code == 2 and "not a scan's folder" in capsys.readouterr().err
    assert (tmp_path / "mine.jsonl.parts" / "thesis.tex").read_text() == "months of work"
    assert sorted(p.relative_to(uploads).as_posix() for p in uploads.rglob("*") if p.is_file()) == sorted(
        names + ["notes.txt"])
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", "digits", "--out", str(tmp_path), "--no-progress"])
    assert stop.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_scan_draws_the_digits_split_with_the_bundles_seed(default_bundle, tmp_path):
    """A bundle trained with --seed 5 was fitted and judged on that seed's digits split: the scan's test split
    is the same one unless --seed says otherwise."""
    import shutil

    from detector import update_bundle

    bundle = tmp_path / "b"
    shutil.copytree(default_bundle, bundle)

    def reseed(stage):
        report = json.loads((stage / "report.json").read_text())
        report["options"]["seed"] = 5
        (stage / "report.json").write_text(json.dumps(report))

    update_bundle(bundle, reseed)
    assert main(["--bundle", str(bundle), "--data", "digits", "--out", str(tmp_path / "s.jsonl"), "--no-progress"]) == 0
    x, _ = load_dataset("digits", train=False, seed=5).batch(slice(0, 40))
    expected = load_bundle(bundle).detect(x).labels.tolist()
    assert [r["label"] for r in rows_of(tmp_path / "s.jsonl")[:40]] == expected
    assert main(["--bundle", str(bundle), "--data", "digits", "--seed", "0", "--out", str(tmp_path / "z.jsonl"),
                 "--no-progress"]) == 0
    x, _ = load_dataset("digits", train=False, seed=0).batch(slice(0, 40))
    assert [r["label"] for r in rows_of(tmp_path / "z.jsonl")[:40]] == load_bundle(bundle).detect(x).labels.tolist()


def test_scan_reads_uploads_as_the_service_does(default_bundle, tmp_path, capsys):
    """EXIF orientation applied, the service's pixel cap, a linked subfolder followed, and a folder it cannot
    write its rows to is an error, not a traceback."""
    import os

    from service.images import decode_image

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    sideways = Image.new("L", (16, 8), 0)
    sideways.paste(255, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(uploads / "phone.jpg", exif=exif.tobytes(), quality=100)
    Image.new("L", (300, 300), 0).save(uploads / "huge.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("L", (8, 8), 128).save(elsewhere / "grey.png")
    os.symlink(elsewhere, uploads / "linked")
    out = tmp_path / "scan.jsonl"
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(out),
                 "--max-pixels", "10000", "--no-progress"]) == 0
    rows = {r["path"]: r for r in rows_of(out)}
    assert sorted(rows) == ["huge.png", "linked/grey.png", "phone.jpg"]
    assert "10,000" in rows["huge.png"]["error"]
    bundle = load_bundle(default_bundle)
    served = decode_image((uploads / "phone.jpg").read_bytes(), "image/jpeg", channels=1, size=(8, 8),
                          max_pixels=10_000)
    answer = bundle.detect(torch.tensor(served).permute(2, 0, 1)[None].float() / 255)
    assert rows["phone.jpg"]["adversarial_score"] == pytest.approx(float(answer.adversarial_score[0]), rel=1e-5)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out",
              str(tmp_path / "a-file" / "scan.jsonl"), "--no-progress"])
    assert stop.value.code == 2 and "detector-scan: error:" in capsys.readouterr().err


def test_scan_refuses_parquet_for_names_that_are_not_utf8_before_scoring(default_bundle, tmp_path, capsys):
    """A file name of Latin-1 bytes: JSON Lines keeps it, Parquet cannot, and says so before any image is scored."""
    pytest.importorskip("pyarrow")
    import os

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    Image.new("L", (8, 8), 0).save(os.path.join(os.fsencode(uploads), b"caf\xe9.png"))
    with pytest.raises(SystemExit) as stop:
        main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(tmp_path / "s.parquet"),
              "--no-progress"])
    assert stop.value.code == 2 and "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "s.parquet.parts").exists() or not any((tmp_path / "s.parquet.parts").glob("rank*"))
    assert main(["--bundle", str(default_bundle), "--data", f"folder:{uploads}", "--out", str(tmp_path / "s.jsonl"),
                 "--no-progress"]) == 0
    (row,) = rows_of(tmp_path / "s.jsonl")
    assert os.fsencode(row["path"]) == b"caf\xe9.png" and "label" in row
