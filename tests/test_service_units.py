"""The service's parts in-process (fast): micro-batcher, settings and flags, upload checks, CLI."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from images_util import (
    bmp_header,
    encode,
    gif_header,
    jpeg_with_scans,
    jpeg_with_size,
    png_header,
    rle_bmp,
    webp_header,
    with_parts,
)
from launch import free_port
from PIL import Image

from detector.devices import DeviceError, resolve_device
from service.batching import MicroBatcher, Overloaded
from service.cli import build_parser, ensure_default_bundle, main, settings_from_args
from service.images import (
    JPEG_MAX_SCANS,
    MAX_PARTS,
    ImageRejected,
    container_parts,
    decode_image,
    header_dimensions,
    jpeg_min_bytes,
    jpeg_scans,
    sniff_format,
)
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_detector_environment(monkeypatch):
    """Defaults are asserted below: a DETECTOR_* variable of the caller's shell must not leak in."""
    for key in list(os.environ):
        if key.startswith("DETECTOR_"):
            monkeypatch.delenv(key)


# -- micro-batcher -------------------------------------------------------------------------------
class Recorder:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, items):
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return [i * 10 for i in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submits_share_batches_up_to_the_maximum():
    async def scenario():
        rec = Recorder()
        b = MicroBatcher(rec, max_batch_size=4, max_wait_s=0.2)
        b.start()
        try:
            results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        finally:
            await b.stop()
        return rec, results

    rec, results = run(scenario())
    assert results == [i * 10 for i in range(10)]
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert sorted(i for batch in rec.batches for i in batch) == list(range(10))


def test_a_lone_request_waits_at_most_max_wait():
    async def scenario():
        b = MicroBatcher(Recorder(), max_batch_size=32, max_wait_s=0.05)
        b.start()
        try:
            start = time.perf_counter()
            await b.submit(1)
            return time.perf_counter() - start
        finally:
            await b.stop()

    elapsed = run(scenario())
    assert 0.045 <= elapsed < 0.05 + 0.1


def test_batch_size_one_turns_batching_off():
    async def scenario():
        rec = Recorder()
        b = MicroBatcher(rec, max_batch_size=1, max_wait_s=1.0)
        b.start()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(b.submit(i) for i in range(5)))
            return rec, time.perf_counter() - start
        finally:
            await b.stop()

    rec, elapsed = run(scenario())
    assert [len(x) for x in rec.batches] == [1] * 5
    assert elapsed < 0.5  # a full batch never waits


def test_items_queued_during_a_batch_form_the_next_one():
    async def scenario():
        rec = Recorder(delay=0.1)
        b = MicroBatcher(rec, max_batch_size=8, max_wait_s=0.0)
        b.start()
        try:
            first = asyncio.create_task(b.submit(0))
            await asyncio.sleep(0.02)  # batch [0] is running now
            rest = await asyncio.gather(*(b.submit(i) for i in range(1, 6)))
            return rec, [await first] + rest
        finally:
            await b.stop()

    rec, results = run(scenario())
    assert results == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]


def test_submit_many_keeps_order_across_batches():
    async def scenario():
        b = MicroBatcher(Recorder(), max_batch_size=3, max_wait_s=0.01)
        b.start()
        try:
            return await b.submit_many(list(range(8)))
        finally:
            await b.stop()

    assert run(scenario()) == [i * 10 for i in range(8)]


def test_a_failing_model_fails_its_batch_and_the_worker_goes_on():
    async def scenario():
        rec = Recorder(fail=True)
        b = MicroBatcher(rec, max_batch_size=4, max_wait_s=0.01)
        b.start()
        try:
            with pytest.raises(RuntimeError, match="exploded"):
                await b.submit(1)
            rec.fail = False
            return await b.submit(2)
        finally:
            await b.stop()

    assert run(scenario()) == 20


def test_full_queue_is_overloaded():
    async def scenario():
        b = MicroBatcher(Recorder(delay=0.2), max_batch_size=1, max_wait_s=0.0, max_queue=2)
        b.start()
        try:
            running = asyncio.create_task(b.submit_many([1, 2]))
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await b.submit_many([3, 4])
            return await running
        finally:
            await b.stop()

    assert run(scenario()) == [10, 20]


def test_cancelled_requests_are_skipped():
    async def scenario():
        rec = Recorder()
        b = MicroBatcher(rec, max_batch_size=8, max_wait_s=0.05)
        b.start()
        try:
            gone = asyncio.create_task(b.submit(99))
            await asyncio.sleep(0.005)
            gone.cancel()
            assert await b.submit(1) == 10
        finally:
            await b.stop()
        return rec

    rec = run(scenario())
    assert all(99 not in batch for batch in rec.batches)


# -- settings and flags ------------------------------------------------------------------------
def test_settings_read_the_detector_prefix(monkeypatch):
    monkeypatch.setenv("DETECTOR_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("DETECTOR_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("DETECTOR_DEVICE", "CPU")
    monkeypatch.setenv("DETECTOR_BUNDLE", "")
    monkeypatch.setenv("DETECTOR_MAX_UPLOAD_BYTES", "1000")
    s = Settings()
    assert (s.max_batch_size, s.max_wait_ms, s.device) == (7, 2.5, "cpu")
    assert s.bundle is None and s.uses_default_bundle and s.bundle_dir == Path("artifacts/default")
    assert s.max_batch_upload_bytes == 4000
    for key in ("DETECTOR_MAX_BATCH_SIZE", "DETECTOR_MAX_WAIT_MS", "DETECTOR_DEVICE", "DETECTOR_BUNDLE",
                "DETECTOR_MAX_UPLOAD_BYTES"):
        monkeypatch.delenv(key)
    defaults = Settings()
    assert (defaults.max_batch_size, defaults.max_wait_ms, defaults.device) == (32, 5.0, "auto")
    assert defaults.max_upload_bytes == 10 * 2**20 and defaults.max_batch_files == 64
    assert defaults.port == 8000 and defaults.host == "127.0.0.1" and defaults.workers == 1


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("DETECTOR_PORT", "9000")
    monkeypatch.setenv("DETECTOR_MAX_PIXELS", "123")
    monkeypatch.setenv("DETECTOR_BUNDLE", "/from/env")
    args = build_parser().parse_args(["--port", "9100", "--bundle", "/from/flag", "--max-batch-size", "1",
                                      "--workers", "2", "--host", "0.0.0.0", "--max-batch-files", "5"])
    s = settings_from_args(args)
    assert s.port == 9100 and s.max_pixels == 123 and s.bundle == Path("/from/flag")
    assert (s.max_batch_size, s.workers, s.host, s.max_batch_files) == (1, 2, "0.0.0.0", 5)
    env = s.to_env()
    assert env["DETECTOR_PORT"] == "9100" and env["DETECTOR_BUNDLE"] == "/from/flag"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == s  # what the workers rebuild from the environment
    # A switch given alone means true; the trust flag takes both spellings, repeated or comma-separated.
    args = build_parser().parse_args(["--verdict-only", "--trust-architecture", "a.b:c",
                                      "--trusted-architectures", "d.e:f, g.h:i", "--forwarded-allow-ips", "10.0.0.1"])
    s = settings_from_args(args)
    assert s.verdict_only and s.trusted_architecture_list == ["a.b:c", "d.e:f", "g.h:i"]
    assert s.forwarded_allow_ips == "10.0.0.1" and not Settings().forwarded_allow_ips  # believed only when named
    assert not settings_from_args(build_parser().parse_args(["--verdict-only", "false"])).verdict_only
    # Behind a proxy the service does not believe, every client is the proxy: no per-client share of uploads.
    assert Settings().max_inflight_body_bytes_per_client == 64 * 2**20  # a quarter of 256 MiB
    assert Settings(max_connections_per_client=0).max_inflight_body_bytes_per_client is None
    assert Settings(max_connections_per_client=0,
                    forwarded_allow_ips="10.0.0.1").max_inflight_body_bytes_per_client == 64 * 2**20


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"device": "tpu"}, {"max_wait_ms": -1}, {"port": 70000},
                                 {"max_upload_bytes": 1000, "max_inflight_body_bytes": 3999}])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


def test_cli_reports_invalid_values(capsys):
    assert main(["--max-batch-size", "0", "--bundle", "x"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:0")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(DeviceError, match="auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


# -- the CLI's bundle handling -------------------------------------------------------------------
def test_cli_refuses_a_broken_bundle_naming_the_file(default_bundle, tmp_path, capsys):
    broken = tmp_path / "b"
    shutil.copytree(default_bundle, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    assert main(["--bundle", str(broken), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "SHA-256" in err
    (broken / "manifest.json").unlink()
    assert main(["--bundle", str(broken), "--port", str(free_port())]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_explicit_bundle_is_never_trained(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("training.pipeline.run", lambda options: pytest.fail("trained an explicit bundle"))
    assert main(["--bundle", str(tmp_path / "nothing-here"), "--port", str(free_port())]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_bundle_is_trained_only_when_missing(default_bundle, tmp_path, monkeypatch):
    calls = []

    def fake_run(options):
        calls.append(options)
        shutil.copytree(default_bundle, options.out)
        return {"detection": {"accuracy": 0.9}}

    monkeypatch.setattr("training.pipeline.run", fake_run)
    target = tmp_path / "artifacts" / "default"
    ensure_default_bundle(target)
    assert len(calls) == 1 and calls[0].out == str(target)
    assert (calls[0].model, calls[0].data) == ("cnn", "digits")  # the embedded default's options
    assert (target / "manifest.json").is_file()
    ensure_default_bundle(target)  # present now: not trained again
    assert len(calls) == 1
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds no bundle"):
        ensure_default_bundle(stray)
    assert (stray / "notes.txt").is_file()


# -- upload checks ---------------------------------------------------------------------------------
def test_sniffing():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF", "ICO"):
        assert sniff_format(encode(Image.fromarray(digit).convert("RGB"), fmt)[:32]) == fmt
    assert sniff_format(b"hello") is None
    assert sniff_format(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20) == "AVIF"


@pytest.mark.parametrize("make,fmt", [(png_header, "PNG"), (gif_header, "GIF"), (bmp_header, "BMP"),
                                      (webp_header, "WEBP")])
def test_header_dimensions_are_read_without_pil(make, fmt):
    assert header_dimensions(make(1234, 567), fmt) == (1234, 567)


def test_header_dimensions_of_real_files():
    im = Image.new("RGB", (37, 21))
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "GIF"):
        assert header_dimensions(encode(im, fmt), fmt) == (37, 21), fmt
    assert header_dimensions(encode(im, "WEBP", lossless=False), "WEBP") == (37, 21)
    assert header_dimensions(encode(im.convert("RGBA"), "WEBP", exif=b"Exif\x00\x00"), "WEBP") == (37, 21)
    jpeg = encode(im, "JPEG", progressive=True)
    assert header_dimensions(jpeg, "JPEG") == (37, 21)
    assert header_dimensions(jpeg_with_size(jpeg, 9, 4), "JPEG") == (9, 4)
    assert header_dimensions(b"\x89PNG\r\n\x1a\n", "PNG") is None


def test_jpeg_scans_are_counted_and_capped():
    assert jpeg_scans(encode(Image.new("RGB", (40, 30)), "JPEG"), 10) == 1
    assert jpeg_scans(encode(Image.effect_noise((40, 30), 80), "JPEG", progressive=True), 100) == 6  # grey
    assert jpeg_scans(encode(Image.new("RGB", (40, 30)), "JPEG", progressive=True), 100) == 10
    many = jpeg_with_scans(300)
    assert jpeg_scans(many, 1000) == 300 and jpeg_scans(many, 20) == 21  # no further than needed
    assert Image.open(io.BytesIO(many)).load() is not None  # libjpeg decodes it: the cap is ours
    first = 4 + int.from_bytes(many[4:6], "big")  # the end of the segment after start-of-image
    junk = many[:first] + b"\x00junk" + many[first:]  # bytes between segments, which PIL and libjpeg skip
    assert Image.open(io.BytesIO(junk)).load() is not None and jpeg_scans(junk, 1000) == 300
    assert header_dimensions(junk, "JPEG") == (64, 64)
    second = many.index(b"\xff\xda", many.index(b"\xff\xda") + 2)
    short = many[:second] + b"\xff\xfe\x00\x00" + many[second:]  # a comment of length 0: libjpeg skips nothing
    assert Image.open(io.BytesIO(short)).load() is not None and jpeg_scans(short, 1000) == 300
    with pytest.raises(ImageRejected) as info:
        decode_image(jpeg_with_scans(JPEG_MAX_SCANS + 1), "image/jpeg", channels=1, size=(8, 8),
                     max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (400, "too_many_scans")
    decode_image(jpeg_with_scans(JPEG_MAX_SCANS), "image/jpeg", channels=1, size=(8, 8), max_pixels=1_000_000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_files_of_many_empty_parts_are_refused_before_decoding(fmt):
    """PIL reads PNG chunks, JPEG segments and GIF blocks one at a time in Python: a 10 MB file of empty
    ones held a decode thread for 6–16 s. Up to the cap they decode (PIL reads them all), one more is refused."""
    base = encode(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)), fmt)
    room = MAX_PARTS - container_parts(base, fmt)
    assert 0 < room <= MAX_PARTS
    full = with_parts(base, fmt, room)
    assert container_parts(full, fmt) == MAX_PARTS
    assert decode_image(full, None, channels=1, size=(8, 8), max_pixels=1_000_000).shape == (8, 8, 1)
    with pytest.raises(ImageRejected) as info:
        decode_image(with_parts(base, fmt, room + 1), None, channels=1, size=(8, 8), max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (400, "too_many_parts")
    assert f"more than {MAX_PARTS:,}" in info.value.message
    # The count stops once past the cap: a flood costs the walk no more than the cap.
    assert container_parts(with_parts(base, fmt, 10 * MAX_PARTS), fmt) == MAX_PARTS + 1


def test_jpeg_bytes_skipped_between_segments_count_as_parts():
    base = encode(Image.new("L", (8, 8)), "JPEG")
    first = 4 + int.from_bytes(base[4:6], "big")  # the end of the segment after start-of-image
    junk = base[:first] + b"\x00" * MAX_PARTS + base[first:]  # PIL steps over them a byte at a time
    Image.open(io.BytesIO(junk)).load()  # PIL and libjpeg read it
    with pytest.raises(ImageRejected) as info:
        decode_image(junk, None, channels=1, size=(8, 8), max_pixels=1_000_000)
    assert info.value.code == "too_many_parts"


def test_the_jpeg_walk_counts_what_pil_walks():
    """PIL's JPEG reader steps over SOI, EOI, RSTn and JPGn markers two bytes at a time and reads on past an
    EOI: a walk that took their next bytes for a length, or stopped at EOI, missed 9 MB of them (3.9 s)."""
    base = encode(Image.new("L", (8, 8)), "JPEG")
    for filler in (b"\xff\xd8", b"\xff\xf0", b"\xff\xd9"):
        flood = base[:2] + filler * MAX_PARTS + base[2:]
        assert container_parts(flood, "JPEG") == MAX_PARTS + 1, filler
        with pytest.raises(ImageRejected) as info:
            decode_image(flood, None, channels=1, size=(8, 8), max_pixels=1_000_000)
        assert info.value.code == "too_many_parts"
    junk_after_end = base[:2] + b"\xff\xd9" + b"\x00" * MAX_PARTS + base[2:]
    assert container_parts(junk_after_end, "JPEG") > MAX_PARTS


def test_metadata_the_decoder_parses_in_python_is_capped():
    """EXIF is parsed whole, one Python step per entry (0.79 MB held a decode thread 4.5 s), and some JPEG
    segments byte by byte: past 64 kB of EXIF or 2 MB before a JPEG's image data, refused; real ones pass."""
    from service.images import JPEG_MAX_METADATA_BYTES, MAX_EXIF_BYTES, jpeg_header

    im = Image.new("L", (8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder turns it upright, parsing the EXIF
    real = encode(im, "JPEG", exif=exif.tobytes())
    assert 0 < jpeg_header(real).exif_bytes < MAX_EXIF_BYTES
    assert decode_image(real, None, channels=1, size=(8, 8), max_pixels=1_000_000).shape == (8, 8, 1)

    def app(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    exif_segment = app(0xE1, b"Exif\x00\x00" + b"\x00" * 60_000)  # PIL joins several into one block
    for data, what in ((real[:2] + exif_segment * 2 + real[2:], "EXIF"),
                       (real[:2] + app(0xED, b"Photoshop 3.0\x00" + b"\x00" * 60_000) * 40 + real[2:], "before")):
        header = jpeg_header(data)
        assert header.exif_bytes > MAX_EXIF_BYTES or header.metadata_bytes > JPEG_MAX_METADATA_BYTES
        with pytest.raises(ImageRejected) as info:
            decode_image(data, None, channels=1, size=(8, 8), max_pixels=1_000_000)
        assert (info.value.status, info.value.code) == (400, "metadata_too_large") and what in info.value.message
    for fmt in ("PNG", "WEBP"):  # EXIF read on open, parsed when the image is turned upright
        big = encode(im, fmt, exif=b"Exif\x00\x00" + b"II*\x00\x08\x00\x00\x00" + b"\x00" * MAX_EXIF_BYTES)
        with pytest.raises(ImageRejected) as info:
            decode_image(big, None, channels=1, size=(8, 8), max_pixels=1_000_000)
        assert info.value.code == "metadata_too_large", fmt
        fine = encode(im, fmt, exif=exif.tobytes())
        assert decode_image(fine, None, channels=1, size=(8, 8), max_pixels=1_000_000).shape == (8, 8, 1)


def test_an_animated_png_of_many_frames_is_not_counted_past_its_first():
    """PIL reads an APNG up to its second frame's control chunk: the frames after it cost nothing."""
    frames = [Image.new("L", (8, 8), i % 256) for i in range(MAX_PARTS // 2 + 100)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    assert data.count(b"fcTL") > MAX_PARTS // 2 and container_parts(data, "PNG") < 10
    assert decode_image(data, None, channels=1, size=(8, 8), max_pixels=1_000_000).shape == (8, 8, 1)


def test_rle_bmp_is_refused_though_pil_reads_it():
    """PIL expands RLE-compressed BMP pixel by pixel in Python: a 17 kB file of 4096×4096 held it for 6 s."""
    data = rle_bmp()
    assert np.array(Image.open(io.BytesIO(data))).tolist() == [[1, 1], [0, 0]]
    with pytest.raises(ImageRejected) as info:
        decode_image(data, "image/bmp", channels=1, size=(8, 8), max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (415, "unsupported_format")
    assert "RLE-compressed BMP" in info.value.message
    plain = encode(Image.new("P", (8, 8)), "BMP")  # uncompressed, with a palette, as the RLE one
    assert decode_image(plain, None, channels=1, size=(8, 8), max_pixels=1_000_000).shape == (8, 8, 1)


def test_a_jpeg_frame_without_components_is_corrupt_not_an_error():
    empty = b"\xff\xd8\xff\xc0\x00\x08\x08\x00\x08\x00\x08\x00\xff\xd9"  # SOF0: 8×8, 0 components
    assert jpeg_min_bytes(empty) is None
    with pytest.raises(ImageRejected) as info:
        decode_image(empty, "image/jpeg", channels=1, size=(8, 8), max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (400, "corrupt_image")


def test_decode_checks_pixels_before_decoding():
    with pytest.raises(ImageRejected) as info:
        decode_image(png_header(5000, 5000), "image/png", channels=1, size=(8, 8), max_pixels=1_000_000)
    assert (info.value.status, info.value.code) == (413, "image_too_large")
    assert "5000×5000" in info.value.message


def test_decode_converts_to_the_input_spec():
    rgba = Image.new("RGBA", (40, 30), (200, 100, 50, 128))
    arr = decode_image(encode(rgba, "PNG"), None, channels=3, size=(32, 32), max_pixels=10_000)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert tuple(arr[0, 0]) == (200, 100, 50)
    grey = decode_image(encode(rgba, "PNG"), "image/png; charset=binary", channels=1, size=(8, 8), max_pixels=10_000)
    assert grey.shape == (8, 8, 1)


def test_exif_orientation_is_applied():
    im = Image.new("L", (20, 10), 0)
    im.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=100)
    arr = decode_image(data, "image/jpeg", channels=1, size=(20, 10), max_pixels=10_000)[..., 0]
    assert arr[:10].mean() > 200 and arr[10:].mean() < 50  # upright: the white half is now on top


def test_jpeg_draft_decoding_matches_full_decoding_closely():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (8, 8), dtype=np.uint8)
    big = Image.fromarray(small).resize((800, 800), Image.NEAREST)
    data = encode(big, "JPEG", quality=95)
    fast = decode_image(data, None, channels=1, size=(8, 8), max_pixels=10**6)[..., 0].astype(int)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((8, 8), Image.BILINEAR)).astype(int)
    assert np.abs(fast - full).max() <= 12


# -- access control --------------------------------------------------------------------------------
def test_rate_limiter_refills_at_its_rate_and_caps_the_burst():
    from service.access import AccessError, RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=4, clock=lambda: now[0])
    limiter.take("a", 4)  # the whole burst at once
    with pytest.raises(AccessError) as info:
        limiter.take("a", 1)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    limiter.take("b", 1)  # its own bucket
    now[0] = 0.5  # one token back
    limiter.take("a", 1)
    with pytest.raises(AccessError):
        limiter.take("a", 1)
    now[0] = 100.0  # refills to the burst, no further
    limiter.take("a", 4)
    with pytest.raises(AccessError, match="more than the burst"):
        limiter.take("a", 5)
    RateLimiter(rate=0.0, burst=0).take("a", 10_000)  # off


def test_rate_limit_check_spends_nothing_and_keeps_refused_clients():
    from service.access import AccessError, RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=2, clock=lambda: now[0])
    for _ in range(5):
        limiter.check("a")  # asking is free
    limiter.take("a", 2)
    with pytest.raises(AccessError) as info:
        limiter.check("a")
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    # The refused client is now the most recently seen: a new client drops the other one, not it,
    # so that being refused never earns a fresh bucket.
    limiter.take("b", 1)
    with pytest.raises(AccessError):
        limiter.check("a")
    limiter.take("c", 1)
    with pytest.raises(AccessError):
        limiter.take("a", 1)
    limiter.take("b", 2)  # b was dropped: a full bucket again


def test_api_keys_name_clients_and_refuse_weak_keys(tmp_path):
    from service.access import AccessError, ApiKeys, read_api_keys

    (tmp_path / "keys").write_text("# comment\nk-0123456789abcdef\n")
    keys = ApiKeys(read_api_keys("k-fedcba9876543210", tmp_path / "keys"))
    assert keys.client("Bearer k-0123456789abcdef", None, "1.2.3.4").startswith("key:")
    assert keys.client(None, "k-fedcba9876543210", None) != keys.client(None, "k-0123456789abcdef", None)
    for auth, header in ((None, None), ("Basic k-0123456789abcdef", None), ("Bearer k-0123456789abcdeX", None)):
        with pytest.raises(AccessError):
            keys.client(auth, header, "1.2.3.4")
    assert ApiKeys([]).client(None, None, "1.2.3.4") == "ip:1.2.3.4"
    with pytest.raises(ValueError, match="shorter than 16"):
        read_api_keys("short", None)
    with pytest.raises(ValueError, match="cannot read"):
        read_api_keys("", tmp_path / "absent")
