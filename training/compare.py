"""``python -m training.compare``: detectors and estimators side by side, on one classifier and one split.

The classifier is trained once (the first run); every other run loads its weights (``--epochs 0``), so
the attacks, the split and the held-out images are the same, and only the detector differs. Each run is
a whole ``detector-train`` with the quick attack suite; the table gives, per (detector, estimator), the
false-positive rate on clean held-out images and the detection rate of each attack of the suite at the
operating point (marked * where the detector was fitted on that attack), with the run's held-out AUROC
on the fitting attack. ::

    python -m training.compare --data digits --out docs/compare-digits.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .cli import count, positive_int, seed_int
from .options import PipelineError, TrainOptions
from .output import check_writable
from .pipeline import run

__all__ = ["COMBINATIONS", "compare", "main"]

#: (detector, estimator): the paper's tree on ψ, the output-layer features, the earlier layers'
#: distances and their channel means too, each with a tree, boosted trees and a logistic regression
#: where it makes sense.
COMBINATIONS = (
    ("paper", None), ("curvature", "tree"), ("curvature", "logistic"), ("curvature", "boosting"),
    ("layers", "tree"), ("layers", "logistic"), ("layers", "boosting"),
    ("activations", "logistic"), ("activations", "boosting"),
)


def _pct(rate: dict | None) -> str:
    """A rate of the evaluation as a percentage; "–" where there is none (no adversarial to detect)."""
    return "–" if not rate or rate.get("rate") is None else f"{rate['rate']:.0%}"


def compare(base: TrainOptions, combinations=COMBINATIONS, workdir: Path | None = None, log=print) -> str:
    """Run every combination and return the Markdown table."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="detector-compare-"))
    log(f"bundles of every combination go to {workdir}")
    rows, attacks, first = [], None, None
    for detector, estimator in combinations:
        options = TrainOptions(**{**vars(base), "detector": detector, "estimator": estimator,
                                  "out": str(workdir / f"{detector}-{estimator or 'own'}"), "evaluate": "quick"})
        if first is not None:
            options.weights, options.epochs = str(first / "weights.pt"), 0
        log(f"compare: {detector} with {estimator or 'its own estimator'} …")
        report = run(options)
        first = first or Path(options.out)
        evaluation = report.get("evaluation") or {}
        attacks = attacks or [a["label"] for a in evaluation.get("attacks", [])]
        by_label = {a["label"]: a for a in evaluation.get("attacks", [])}
        seen = set(evaluation.get("seen_in_fitting", []))
        rows.append([detector, estimator or f"its own ({report['detection']['estimator'].split('(')[0]})",
                     _pct(evaluation.get("clean", {}).get("false_positives_correct")),
                     *(_pct(by_label.get(label, {}).get("detection")) + ("*" if label in seen else "")
                       for label in attacks),
                     f"{report['detection']['auroc']:.3f}"])
    columns = ["detector", "estimator", "clean flagged", *(attacks or []), "AUROC (fitting attack)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", "\\* an attack that detector was fitted on (on other images)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--model", default="cnn")
    p.add_argument("--epochs", type=count, default=None)
    p.add_argument("--max-samples", type=positive_int, default=2000)
    p.add_argument("--evaluate-images", type=count, default=500)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    base = TrainOptions(data=args.data, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
                        max_samples=args.max_samples, evaluate_images=args.evaluate_images, seed=args.seed,
                        progress=False)
    command = "python -m training.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.out:  # found out now, not after every run
            check_writable(Path(args.out))
        table = compare(base, log=lambda m: print(m, file=sys.stderr, flush=True))
        text = f"Command: `{command}`\n\n{table}"
        print(text)  # before writing: a file that cannot be written loses nothing
        if args.out:
            Path(args.out).write_text(text)
    except (PipelineError, ValueError, OSError) as exc:
        print(f"python -m training.compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
