"""``detector-evaluate``: judge a bundle against the attack suite on held-out images of its dataset.

The images are the bundle's test split minus every image its detector was fitted or calibrated on
(``split.json``), checked disjoint in :func:`detector.evaluation.evaluate`.  Writes
``evaluation.json`` (every rate with its interval, the image ids of every evaluated row),
``evaluation.md`` and three plots to ``--out``; with ``--attach`` also into the bundle, whose
``report.json`` (what ``/model`` serves as its coverage) then carries this evaluation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from detector import BundleError, distributed, load_bundle, update_bundle
from detector.evaluation import (
    HELD_OUT_DRAW,
    SUITE_LEVELS,
    attack_suite,
    evaluate,
    held_out_images,
)
from detector.shifts import SHIFTS

from . import report as reporting
from .classifier import predict
from .cli import (
    HelpFormatter,
    _number,
    _positive_number,
    add_trust_flag,
    positive_int,
    seed_int,
    shift_names,
    trusted_names,
)
from .fitting import seen_in_fitting
from .options import PAPER_ATTACK, PipelineError, TrainOptions, resolve_device
from .output import check_results_dir, dump_json, json_safe
from .pipeline import summarize_evaluation
from .prepare import load_splits

__all__ = ["attach_evaluation", "build_parser", "evaluation_title", "main", "read_evaluation", "run_evaluation"]


def read_evaluation(path: str | Path) -> dict:
    """An evaluation as ``detector-evaluate`` wrote it: ``evaluation.json`` or the folder holding it."""
    path = Path(path)
    file = path / "evaluation.json" if path.is_dir() else path
    try:
        evaluation = json.loads(file.read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise PipelineError(f"{file} is not JSON: {exc}") from exc
    if not isinstance(evaluation, dict):
        raise PipelineError(f"{file} is not an evaluation detector-evaluate wrote")
    return evaluation


def _suite_shifts(text: str) -> tuple[str, ...]:
    """``--shifts``: as ``--clean-variants`` reads them, ``default`` being the suite's own list."""
    return shift_names(text, default=tuple(SHIFTS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detector-evaluate",
        description="Attack a bundle's classifier with the whole suite (FGSM, PGD at several radii, PGD-L2, "
                    "early-stopped PGD, CW-L2, DeepFool, APGD-CE, Square, and adaptive attacks that know the "
                    "detector) and natural shifts, on held-out test images, and report what the detector "
                    "catches at its operating point.",
        formatter_class=HelpFormatter)
    p.add_argument("--bundle", required=True, help="the bundle directory (written by detector-train)")
    p.add_argument("--suite", choices=SUITE_LEVELS, default="full",
                   help="which attacks to run; shifts: none, only the clean images' false positives and the natural "
                        "shifts (forward passes only: cheap on many images, --max-images 5000)")
    p.add_argument("--data", help="dataset spec (default: the one in the bundle's report)")
    p.add_argument("--data-dir", help="where cifar10/cifar100 live (default: the bundle's report)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--shifts", type=_suite_shifts, default=tuple(SHIFTS),
                   metavar="NAME,NAME,…|none",
                   help="the natural shifts measured (default: " + ", ".join(SHIFTS) + "); any change "
                        "--clean-variants takes ('JPEG q30', 'noise sigma=0.04'): 'default,JPEG q60' keeps the list "
                        "and adds one, 'none' measures the clean images alone")
    p.add_argument("--max-images", type=positive_int, default=1000,
                   help="held-out test images to evaluate on (at most; fewer, with a warning, when fewer are left): "
                        "drawn at random from those not used in fitting, with the classifier's share of mistakes on "
                        "the whole split")
    p.add_argument("--target-fpr", type=_number, default=0.05,
                   help="false-positive rate the baselines are thresholded at on clean calibration images")
    p.add_argument("--eps", type=_positive_number,
                   help="reference L∞ radius the suite's radii are scaled to (default: the bundle's PGD ε)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps")
    add_trust_flag(p)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", help="output directory (default, beside the bundle: <bundle>-evaluation for the full suite, "
                        "<bundle>-evaluation-quick or -shifts for the others)")
    p.add_argument("--attach", action="store_true",
                   help="also write the evaluation into the bundle, replacing the one it holds, so that the "
                        "service's /model reports it as the bundle's coverage; this changes the bundle's SHA-256 "
                        "(printed), so update any --bundle-sha256 pin")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_evaluation(args: argparse.Namespace, command: str | None = None) -> dict:
    """Evaluate ``args.bundle`` and write the files; returns the evaluation as a dict."""
    bundle_dir = Path(args.bundle)
    if not 0.0 <= args.target_fpr < 1.0:
        raise PipelineError(f"--target-fpr must lie in [0, 1), got {args.target_fpr}")
    out = Path(args.out) if args.out else default_out(bundle_dir, args.suite)
    check_results_dir(out, attach_hint=True)  # before the suite runs, not after
    device = resolve_device(args.device)
    distributed.init(device)  # under torchrun every rank attacks its share of the images
    bundle = load_bundle(bundle_dir, map_location=device, trusted_architectures=trusted_names(args.trust_architecture))
    report = bundle.report or {}
    options = report.get("options", {})
    if not isinstance(options, dict):
        raise PipelineError(f"{bundle_dir / 'report.json'}'s options are not the object detector-train writes")
    split_file = bundle_dir / "split.json"
    if not split_file.is_file():
        raise PipelineError(f"{split_file} is missing: without the ids of the images the detector was fitted on, "
                            f"held-out images cannot be told apart")
    split = json.loads(split_file.read_text())
    if not isinstance(split, dict):
        raise PipelineError(f"{split_file} is not one detector-train wrote (a JSON object of image ids)")
    fitted = np.asarray(split.get("fit", []), dtype=np.int64)
    calibration = np.asarray(split.get("calibration", []), dtype=np.int64)
    data = args.data or options.get("data")
    if not data:
        raise PipelineError("the bundle's report names no dataset: pass --data")
    spec = bundle.input_spec
    # folder: images are resized to what the bundle takes, as they were for fitting.
    size = [spec.height, spec.width] if data.partition(":")[0] == "folder" else None
    train, test, _, source = load_splits(TrainOptions(data=data, data_dir=args.data_dir or options.get("data_dir", "data"),
                                                      seed=options.get("seed", 0), download=args.download,
                                                      image_size=size))
    if test.input_shape != (spec.channels, spec.height, spec.width):
        raise PipelineError(f"{data} images are {test.input_shape}, the bundle takes "
                            f"{(spec.channels, spec.height, spec.width)}")
    excluded = np.union1d(fitted, calibration)
    # split.json names positions in the test split the detector was fitted on: they must exist here, and
    # the held-out check means something only on that same split.
    if excluded.size and excluded.max() >= len(test):
        raise PipelineError(f"the bundle was fitted on test images up to position {int(excluded.max())}, but {data} "
                            f"has {len(test)} test images: it is not the dataset the detector was fitted on "
                            f"({options.get('data', 'see its report')})")
    data_info = report.get("data") if isinstance(report.get("data"), dict) else {}
    if (data == options.get("data") and options.get("test_samples") is None
            and isinstance(data_info.get("n_test"), int) and data_info["n_test"] != len(test)):
        raise PipelineError(f"the bundle was fitted on a test split of {data_info['n_test']} images, {data} now has "
                            f"{len(test)}: files were added or removed (or are read differently), so the ids in "
                            f"split.json no longer name the images the detector was fitted on")
    if args.attach and options.get("data") and data != options["data"]:
        raise PipelineError(f"--attach: the bundle was fitted on {options['data']}; an evaluation on {data} is not "
                            f"its coverage")
    if options.get("data") and data != options["data"] and distributed.is_main():
        print(f"detector-evaluate: warning: evaluating on {data}, the bundle was fitted on {options['data']}; "
              f"images are told apart from the fitted ones by position in the test split only",
              file=sys.stderr, flush=True)
    if args.attach and args.suite == "shifts":
        raise PipelineError(f"--attach: {NOT_ATTACHABLE}")
    if args.attach and tuple(args.shifts) != tuple(SHIFTS):
        raise PipelineError(f"--attach: {OTHER_SHIFTS}")
    if args.eps is not None and args.suite == "shifts":
        raise PipelineError("--eps scales the attacks' radii; the shifts suite runs no attack")
    if args.max_images < 40:
        raise PipelineError("--max-images must be at least 40")
    correct = (predict(bundle.model, test, batch_size=max(args.batch_size, 256), device=device,
                       progress=not args.no_progress and distributed.is_main()) == test.labels).numpy()
    # Rank 0's draw on every rank: the draw follows each rank's own predictions.
    images = distributed.broadcast(held_out_images(correct, excluded, args.max_images,
                                                   np.random.default_rng(args.seed)))
    if len(images) < args.max_images and distributed.is_main():
        print(f"detector-evaluate: warning: {len(images)} held-out images, not {args.max_images}: the test split has "
              f"{len(test)}, the detector was fitted or calibrated on {len(excluded)}, and the draw keeps the "
              f"classifier's share of mistakes", file=sys.stderr, flush=True)
    attack = report.get("attack", {})
    eps = args.eps if args.eps is not None else (
        attack.get("eps") if attack.get("norm", "linf") == "linf" else None) or PAPER_ATTACK["eps"]
    started = time.perf_counter()
    evaluation = evaluate(
        bundle, test, images, excluded=excluded, calibration=calibration if calibration.size >= 20 else None,
        suite=attack_suite(eps, int(np.prod(test.input_shape)), args.suite, args.seed), shifts=args.shifts,
        reference=train,
        target_fpr=args.target_fpr, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress and distributed.is_main(), held_out_draw=HELD_OUT_DRAW,
    ).to_dict()
    evaluation["data"] = {"spec": data, "source": source}
    if isinstance(report.get("detection"), dict) and isinstance(report["detection"].get("detector"), str):
        evaluation["detector"] = {"name": report["detection"]["detector"], **evaluation["detector"]}
    evaluation["radius_scale"] = eps / PAPER_ATTACK["eps"]
    evaluation["bundle"] = {"path": str(bundle_dir.resolve()), "sha256": bundle.sha256}  # readable from any cwd
    evaluation["suite"] = args.suite
    evaluation["command"] = command
    evaluation["seen_in_fitting"] = seen_in_fitting(report, evaluation["attacks"])
    evaluation = json_safe(evaluation)
    if not distributed.is_main():  # rank 0 writes
        return evaluation
    reporting.write_evaluation(out, evaluation, title=evaluation_title(bundle.architecture, evaluation), command=command)
    if args.attach:
        evaluation["attached_sha256"] = attach_evaluation(bundle_dir, evaluation)
    evaluation["out"] = str(out)
    evaluation["wall_seconds"] = round(time.perf_counter() - started, 1)
    return evaluation


def default_out(bundle_dir: Path, suite: str) -> Path:
    """Where an evaluation goes without ``--out``: ``<bundle>-evaluation`` for the full suite,
    ``<bundle>-evaluation-<suite>`` for the others, so that a cheaper run never replaces a fuller one."""
    suffix = "" if suite == "full" else f"-{suite}"
    bundle_dir = bundle_dir.resolve()  # --bundle . names the folder, not its parent's child "."
    return bundle_dir.parent / f"{bundle_dir.name}-evaluation{suffix}"


def evaluation_title(architecture: str, evaluation: dict) -> str:
    """The line under ``evaluation.md``'s heading: what was judged, on what, by which suite."""
    return (f"{architecture} on {evaluation['data']['spec']}; bundle {evaluation['bundle']['sha256'][:12]}; "
            f"{evaluation['suite']} suite, {len(evaluation['image_ids']['evaluated'])} held-out images")


NOT_ATTACHABLE = ("an evaluation without attacks (the shifts suite) is not attached: it would replace the bundle's "
                  "coverage with its false-positive figures alone")
OTHER_SHIFTS = ("an evaluation on other natural shifts than the suite's own list (" + ", ".join(SHIFTS) + ") is not "
                "attached: the bundle's coverage reports them all; evaluate without --shifts")
#: What an evaluation must hold to be attached to a bundle (``detector-evaluate`` writes them all).
ATTACHABLE = ("detector", "target_fpr", "clean", "attacks", "shifts", "image_ids", "data", "bundle", "suite",
              "seconds")


def _check_attachable(evaluation: Any) -> None:
    missing = [key for key in ATTACHABLE if key not in evaluation] if isinstance(evaluation, dict) else ["everything"]
    if not missing:
        shapes = {"bundle.sha256": isinstance(evaluation["bundle"], dict)
                  and isinstance(evaluation["bundle"].get("sha256"), str),
                  "data.spec": isinstance(evaluation["data"], dict) and isinstance(evaluation["data"].get("spec"), str),
                  "image_ids.evaluated": isinstance(evaluation["image_ids"], dict)
                  and isinstance(evaluation["image_ids"].get("evaluated"), list)}
        missing = [name for name, ok in shapes.items() if not ok]
    if missing:
        raise PipelineError(f"not an evaluation detector-evaluate wrote: it lacks {', '.join(missing)}")
    if not evaluation["attacks"]:
        raise PipelineError(NOT_ATTACHABLE)
    shifts = evaluation["shifts"]
    if not isinstance(shifts, list) or [s.get("name") if isinstance(s, dict) else None for s in shifts] != list(SHIFTS):
        raise PipelineError(OTHER_SHIFTS)


def _evaluation_files(report: dict) -> dict[str, str]:
    """The evaluation files a bundle's ``report.json`` lists, by key: only plain file names, so that a
    crafted report cannot name a file outside the bundle (``../x``, ``/home/…``) for the update to remove."""
    files = report.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items()
            if isinstance(k, str) and k.startswith("evaluation") and isinstance(v, str)
            and v not in ("", ".", "..") and Path(v).name == v and "\\" not in v}


def attach_evaluation(bundle_dir: str | Path, evaluation: dict) -> str:
    """Write ``evaluation`` (``detector-evaluate``'s) into the bundle it judged, as ``detector-train
    --evaluate`` does: its files (replacing the evaluation files there), its summary as
    ``report.json``'s ``evaluation`` (what ``/model`` serves) with ``report.md`` written again, and its
    image ids in ``split.json``.  Refused unless the bundle is still the one evaluated (same hash)
    and the evaluation ran on the bundle's dataset; returns the bundle's new hash."""
    _check_attachable(evaluation)

    def write(stage: Path) -> None:
        report_file = stage / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if not isinstance(report, dict) or not isinstance(report.get("options", {}), dict):
            raise PipelineError("the bundle's report.json is not one detector-train wrote")
        fitted_on = report.get("options", {}).get("data")
        if fitted_on and evaluation["data"]["spec"] != fitted_on:
            raise PipelineError(f"the evaluation ran on {evaluation['data']['spec']}, the bundle was fitted on "
                                f"{fitted_on}: its figures are not the bundle's coverage")
        # The evaluation files of the one it replaces go, so that no plot of it is left behind (files under
        # other names than today's included: write_evaluation removes today's names it does not write).
        previous = _evaluation_files(report)
        for name in previous.values():
            if (stage / name).is_file():
                (stage / name).unlink()
        architecture = json.loads((stage / "config.json").read_text())["architecture"]
        try:
            files = reporting.write_evaluation(stage, evaluation, title=evaluation_title(architecture, evaluation),
                                               command=evaluation.get("command"))
            report["evaluation"] = summarize_evaluation(evaluation)
            report["evaluation_command"] = evaluation.get("command")
            # Every earlier evaluation entry goes from the list, named safely or not: these files replace them.
            kept = report["files"] if isinstance(report.get("files"), dict) else {}
            report["files"] = {**{k: v for k, v in kept.items() if not str(k).startswith("evaluation")}, **files}
            dump_json(report_file, report)
            if (stage / "report.md").is_file():
                reporting.write_markdown(stage / "report.md", report)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise PipelineError(f"cannot write this evaluation into the bundle's report "
                                f"({type(exc).__name__}: {exc}): is it one detector-evaluate wrote?") from exc
        if (stage / "split.json").is_file():
            split = json.loads((stage / "split.json").read_text())
            if not isinstance(split, dict):
                raise PipelineError("the bundle's split.json is not one detector-train wrote (a JSON object)")
            split["evaluated"] = evaluation["image_ids"]["evaluated"]
            dump_json(stage / "split.json", split)

    return update_bundle(bundle_dir, write, expected_sha256=evaluation["bundle"]["sha256"])


def main(argv: list[str] | None = None) -> int:
    """``detector-evaluate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join(["detector-evaluate", *map(shlex.quote, argv)])
    try:
        evaluation = run_evaluation(args, command)
    except (PipelineError, BundleError, ValueError, OSError) as exc:  # OSError: a file it cannot read or write
        parser.exit(2, f"detector-evaluate: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "detector-evaluate: interrupted\n")
    finally:
        distributed.shutdown()
    if not distributed.is_main():
        return 0
    print("\n".join(reporting.evaluation_markdown(evaluation)))
    plots = ", plots" if evaluation["attacks"] else ""
    print(f"\nwritten to {evaluation['out']}/ (evaluation.json, evaluation.md{plots}) in "
          f"{evaluation['wall_seconds']:.0f} s")
    if "attached_sha256" in evaluation:
        print(f"attached to {args.bundle}: /model reports this evaluation once the service loads the bundle again; "
              f"the bundle's new SHA-256 (update any --bundle-sha256 pin): {evaluation['attached_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
