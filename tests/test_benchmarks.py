"""Smoke tests of the benchmark suite: every script runs in its smallest mode and its rows
are well formed.  No timing is asserted here (timings belong in docs/BENCHMARKS.md); the one number
checked is the κ error against the exact Hessian, which is correctness, not speed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import common, kappa, overhead, pgd_throughput, run_all
from benchmarks.common import Section, Stats, interleaved, reference_detector
from detector.models import SmallCNN


def _tiny_case(name: str, **extra):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    return {"name": name, "module": SmallCNN(10, 3, width=8).eval(), "model": "tiny",
            "x": torch.rand(3, 3, 16, 16, generator=gen), "y": torch.randint(0, 10, (3,), generator=gen),
            "n": 3, "attack": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 2}, **extra}


def _well_formed(section: Section) -> None:
    assert section.tables
    for table in section.tables:
        assert table.rows, table.title
        for row in table.rows:
            assert len(row) == len(table.columns)
            assert all(cell is not None and str(cell) != "" for cell in row)
    for target in section.targets:
        assert target.met in (True, False, None) and target.measured
    assert section.seconds > 0 and section.load_before is not None


def test_interleaved_timing_and_stats():
    calls = []
    samples, number = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                  repeats=4, min_sample_s=0.0, warmup=1)
    assert number == 1 and len(samples["a"]) == len(samples["b"]) == 4
    # Rounds alternate their order: a b, b a, a b, b a (after the warm-up and the calibration call).
    assert calls[3:] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    st = Stats.of([3.0, 1.0, 2.0, 4.0])
    assert (st.median, st.min, st.max, st.n) == (2.5, 1.0, 4.0, 4) and st.q1 <= st.median <= st.q3


def test_overhead_smallest_mode():
    section = overhead.run(archs=("cnn",), batch_sizes=(2,), quick=True, detector_source="random",
                           plan=lambda *a: (2, 0.0), log=lambda *a: None)
    _well_formed(section)
    (row,) = section.raw["rows"]
    assert row["batch"] == 2 and row["repeats"] == 2
    for name in ("forward", "detect", "default", "squeeze", "mahalanobis", "forward again"):
        assert row["times"][name]["median"] > 0
    assert math.isfinite(row["detect/forward"]["median"]) and math.isfinite(row["default/forward"]["median"])
    # the noise floor: the same forward timed again, in the table beside the detectors' ratios
    assert math.isfinite(row["forward again/forward"]["median"])
    assert "forward again / forward" in section.tables[0].columns
    assert len(row["samples"]["forward"]) == 2  # the raw samples, so that the ratios can be derived again


def test_each_item_is_written_as_it_finishes(tmp_path):
    """A run stopped after its first item (here by an unknown second one; on a GPU lease by its time limit)
    keeps what the first measured, with the commit and date it was measured at."""
    args = ["--quick", "--only", "overhead,nonsense", "--archs", "cnn", "--batch-sizes", "2", "--repeats", "2",
            "--no-reference-detectors", "--results-dir", str(tmp_path), "--out", str(tmp_path / "B.md")]
    with pytest.raises(SystemExit, match="unknown item 'nonsense'"):
        run_all.main(args)
    (section,) = json.loads((tmp_path / "cpu.json").read_text())["sections"]
    assert section["key"] == "overhead" and section["raw"]["measured"]["date"]
    assert [r["repeats"] for r in section["raw"]["rows"]] == [2]  # --repeats
    assert "squeeze (4 fwd)" not in section["tables"][0]["columns"]  # --no-reference-detectors
    assert "### 1. Detection overhead" in (tmp_path / "B.md").read_text()


def test_overhead_times_the_detector_kind_it_is_given():
    """``--detector gram``: the timed bundle reads the Gram matrices, and the table and target say which
    detector they timed."""
    section = overhead.run(archs=("cnn",), batch_sizes=(32,), quick=True, peers=False, detector_source="random",
                           detector="gram", plan=lambda *a: (2, 0.0), log=lambda *a: None)
    assert "(`gram`)" in section.description and "Gram matrices" in section.description
    assert any("selectable (gram) detector" in t.name for t in section.targets)
    assert run_all.build_parser().parse_args(["--detector", "gram"]).detector == "gram"
    with pytest.raises(SystemExit):
        run_all.build_parser().parse_args(["--detector", "nonsense"])
    assert "detect (gram)" in section.tables[0].columns
    model = overhead.cifar_model("cnn", torch.device("cpu"))
    assert common.reference_bundle(model, torch.device("cpu"), n=64, detector="gram").detector.layer_gaussians.gram_probes
    # kinds that read no earlier layer are timed as they are built: no layer statistics, their own classifier
    paper = common.reference_bundle(model, torch.device("cpu"), n=64, detector="paper").detector
    assert paper.layer_gaussians is None and paper.target_fpr is None
    assert common.describe_detector("paper").endswith("`psi` features, DecisionTreeClassifier")


def test_operation_count_leaves_out_views_and_conversions_that_return_their_input():
    x = torch.rand(4, 3)
    # view, a float32 → float32 conversion: no kernel; add, in-place relu, sum: three
    assert common.count_operations(lambda: x.view(-1).to(torch.float32).add(1).relu_().sum()) == 3
    assert common.count_operations(lambda: x.to(torch.float64)) == 1  # a real conversion is a kernel
    section = overhead.run(archs=("cnn",), batch_sizes=(2, 4), quick=True, peers=False, detector_source="random",
                           detector="every-layer", plan=lambda *a: (2, 0.0), log=lambda *a: None)
    (row,) = section.raw["operations"]  # counted once per model and precision, at the first batch
    assert row["batch"] == 2 and 0 < row["forward"] < row["detect"] < row["default"]
    assert section.tables[2].rows[0][3:6] == [row["forward"], row["detect"], row["default"]]


def test_peer_detectors_return_one_score_per_input():
    model = SmallCNN(10, 3, width=8).eval()
    x = torch.rand(4, 3, 16, 16)
    amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    assert overhead.FeatureSqueezingStyle(model, amp)(x).shape == (4,)
    assert overhead.MahalanobisStyle(model, amp, 10, model.fc.in_features, torch.device("cpu"))(x).shape == (4,)
    # The 2×2 median keeps the image size (feature squeezing's squeezers are size-preserving).
    assert overhead._median(x, 2).shape == x.shape and overhead._median(x, 3).shape == x.shape


def test_kappa_smallest_mode_and_error_against_exact_hessian():
    section = kappa.run(quick=True, repeats=1, cases=[_tiny_case("tiny cnn", exact=2)], log=lambda *a: None)
    _well_formed(section)
    (case,) = section.raw["cases"]
    assert case["images"] == 3 * 3  # 3 paths × (2 steps + 1)
    # The closed form agrees with the exact autograd Hessian trace (float64) on the same (logits, φ) to 1e-6,
    # as the product runs it (float32) and in float64.
    errors = case["errors"]
    assert errors["detector.relative_sharpness on the float32 forward's (logits, φ)"] <= 1e-6
    assert errors["float64 model: detector.relative_sharpness vs autograd on its (logits, φ)"] <= 1e-6
    error_target = [t for t in section.targets if "error" in t.name]
    assert error_target and error_target[0].met is True


def test_path_capture_matches_the_recorded_path():
    case = _tiny_case("tiny")
    path, result = kappa.capture_path(case["module"], case["x"], case["y"], **case["attack"])
    assert path.shape == (3, 3, 3, 16, 16)
    assert torch.equal(path[:, 0], case["x"]) and torch.equal(path[:, -1], result.x_adv)
    loop, _ = kappa.per_sample_loop(case["module"], path, case["y"])
    assert torch.allclose(loop, result.sharpness, rtol=1e-4)


def test_pgd_throughput_smallest_mode():
    section = pgd_throughput.run(quick=True, cases=[_tiny_case("tiny cnn", batch=3, repeats=1)],
                                 log=lambda *a: None)
    _well_formed(section)
    (case,) = section.raw["cases"]
    assert case["max_abs_diff"] == 0.0  # same adversarial batch as ART (L∞, no random start)
    assert all(v > 0 for v in case["images_per_s"].values())


def test_render_writes_every_table_and_marks_gpu_rows(tmp_path):
    section = overhead.run(archs=("cnn",), batch_sizes=(1,), quick=True, peers=False, detector_source="random",
                           plan=lambda *a: (2, 0.0), log=lambda *a: None)
    from dataclasses import asdict

    run = {"command": "python -m benchmarks --quick", "machine": {"cpu": "test"}, "load_start": (0.1, 0.1, 0.1),
           "load_end": (0.2, 0.2, 0.2), "seconds": 1.0, "quick": True, "sections": [asdict(section)]}
    text = run_all.render({"cpu": run})
    assert "# Benchmarks" in text and "## Targets" in text and "detect / forward" in text
    assert "not yet measured (no GPU lent in this task)" in text
    assert text.count("| cnn | fp32 | 1 |") >= 1


def test_reference_detector_tree_has_the_right_width():
    det = reference_detector("random", 10)
    assert det.n_features_in_ == 10 and hasattr(det, "valley_threshold_")


@pytest.mark.slow
def test_service_load_smallest_mode(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("service.cli")
    from benchmarks import service_load

    section = service_load.run(quick=True, workdir=str(tmp_path), concurrency=4, duration_s=1.0, warmup_s=0.3,
                               light_s=0.0, modes=("on", "batch"), log=lambda *a: None)
    (entry,) = section.raw["bundles"]
    single, batch = entry["modes"]
    for mode in (single, batch):
        assert mode["requests_ok"] > 0 and mode["errors"] == {}
        assert mode["rss_start"] and mode["rss_end"]
    # /predict/batch answers k images per request, each checked by the load generator.
    assert batch["images_per_request"] == service_load.BATCH_UPLOAD > 1
    assert batch["images_per_s"] == pytest.approx(batch["req_per_s"] * service_load.BATCH_UPLOAD)
    assert entry["ceiling"]["with_decode"]["median"] > 0
