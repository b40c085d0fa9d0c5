"""``python -m training.robustness``: bundles side by side under the attack suite.

Reads the ``evaluation.json`` that ``detector-evaluate`` wrote for each bundle (a standard and an
adversarially trained classifier, say, or two detectors on one classifier; an attack that an older
evaluation's suite lacked shows as "–") and writes Markdown tables
(clean accuracy and false positives and the evasion budget per group of attacks; per attack: accuracy
under attack, detection, evasion and AUROC, marked where the detector was fitted on that attack, and
where its adversarials land beside clean images; per natural shift: the share flagged; and how each
drew its held-out images, with a warning when they differ) and one plot of
evasion rate against L∞ budget with a line per bundle.  Each bundle flags at its own operating point, so
their clean false-positive rates on the held-out images differ; ``--matched-fpr`` adds each attack's
detection with every bundle thresholded anew at the same share of its held-out clean images. ::

    python -m training.robustness runs/standard-evaluation runs/robust-evaluation \\
        --names standard robust --out docs/figures/robustness.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from detector.estimator import flagging_threshold

from .evaluate import read_evaluation
from .fitting import seen_in_fitting
from .options import PipelineError
from .report import SEEN_IN_FITTING, _num, _pct, budget_text, plot_evasion_budget

__all__ = ["load", "main", "matched_detection", "side_by_side"]

#: How an evaluation that does not record its draw is described: those written before the draw was
#: recorded took their held-out images uniformly from the images left over after fitting.
OLD_DRAW = "not recorded (older evaluations drew uniformly from the images left over)"


def load(path: str | Path) -> dict:
    """An evaluation (``evaluation.json`` or the folder holding it) and its bundle's report, if found."""
    evaluation = read_evaluation(path)
    path = Path(path)
    # detector-evaluate names the bundle; detector-train's own suite sits inside the bundle.
    here = path if path.is_dir() else path.parent
    named = evaluation.get("bundle", {}).get("path") if isinstance(evaluation.get("bundle"), dict) else None
    # As written (older evaluations wrote it relative to where detector-evaluate ran), or beside the
    # evaluation folder, where detector-evaluate puts it by default.
    if not named:
        candidates = [here]
    elif Path(named).is_absolute():
        candidates = [Path(named)]
    else:  # relative to wherever detector-evaluate ran: beside the evaluation folder is the surer guess
        candidates = [here.parent / Path(named).name, Path(named)]
    report_file = next((c / "report.json" for c in candidates if (c / "report.json").is_file()), here / "report.json")
    evaluation["_report"] = json.loads(report_file.read_text()) if report_file.is_file() else {}
    return evaluation


def _name(path: str) -> str:
    """The folder's name for ``…/NAME`` or ``…/NAME/evaluation.json``."""
    p = Path(path)
    return p.parent.name if p.name == "evaluation.json" else p.name


def _classifier_line(evaluation: dict) -> str:
    c = evaluation["_report"].get("classifier", {})
    at = c.get("adversarial_training")
    return at["described"] if at else ("standard training" if c.get("epochs") else "weights as given")


def matched_detection(evaluation: dict, fpr: float) -> tuple[float, dict[str, float | None]]:
    """The evaluation's detector thresholded anew so that at most ``fpr`` of its held-out clean, correctly
    classified images are flagged (ties not flagged): the share of them flagged, and per attack label the
    share of its successful adversarials flagged and per natural shift the share of its images."""
    clean = np.asarray(evaluation["clean"]["scores_correct"], dtype=np.float64)
    threshold = flagging_threshold(clean, fpr)

    def flagged(scores: list[float]) -> float | None:
        return float(np.mean(np.asarray(scores, dtype=np.float64) >= threshold)) if scores else None

    return float(np.mean(clean >= threshold)), {
        **{a["label"]: flagged(a["scores"]) for a in evaluation["attacks"]},
        **{s["name"]: flagged(s["scores"]) for s in evaluation.get("shifts", [])}}


def side_by_side(evaluations: dict[str, dict], matched_fpr: float | None = None) -> str:
    """The Markdown tables for ``{name: evaluation}``; an attack one of them did not run reads "–".
    ``matched_fpr``: also each attack's detection with every detector at that clean false-positive rate
    on its own held-out images (:func:`matched_detection`)."""
    names = list(evaluations)
    first = evaluations[names[0]]
    # Attacks in the order first met; one an evaluation did not run (an older suite) reads "–".
    by_label = {n: {a["label"]: a for a in ev["attacks"]} for n, ev in evaluations.items()}
    # Per evaluation, the attacks its detector was fitted on (with these parameters, other images).
    seen = {n: set(ev.get("seen_in_fitting", [])) | set(seen_in_fitting(ev.get("_report", {}), ev["attacks"]))
            for n, ev in evaluations.items()}
    labels = list(dict.fromkeys(label for n in names for label in by_label[n]))
    shared = [label for label in labels if all(label in by_label[n] for n in names)]
    if not shared and all(by_label.values()):  # a shifts suite (no attack) is compared on clean and shifts only
        raise ValueError(f"{' and '.join(names)} share no attack: compare like with like")
    head = "| | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    lines = [head, rule]

    def row(title: str, cell) -> None:
        lines.append(f"| {title} | " + " | ".join(cell(evaluations[n]) for n in names) + " |")

    row("classifier", _classifier_line)
    row("clean accuracy (held out)", lambda ev: _pct(ev["clean"]["accuracy"]))
    row("robust accuracy, PGD-10 at the training radius",
        lambda ev: _pct((ev["_report"].get("classifier", {}).get("robust_accuracy") or {}).get("accuracy")))
    row("clean flagged (correct images)", lambda ev: _pct(ev["clean"]["false_positives_correct"]["rate"]))
    row("held-out images drawn with", lambda ev: ev.get("held_out_draw") or OLD_DRAW)
    groups = dict.fromkeys(g for ev in evaluations.values() for g in ev.get("evasion_budget", {}).get("groups", {}))
    for group in groups:
        def cell(ev, group=group):
            if group not in ev.get("evasion_budget", {}).get("groups", {}):
                return "–"  # an evaluation written before the budget was measured
            g = ev["evasion_budget"]["groups"][group]["linf"]
            low, high = g["median_interval"]
            return (f"**{budget_text(g['median'])}** [{budget_text(low)}–{budget_text(high)}]; "
                    f"{_pct(g['evaded']['rate'])} evaded")
        row(f"evasion budget L∞, {group}: median [95% CI]", cell)
    if labels:
        lines += ["", "| attack | kind | " + " | ".join(f"{n}: acc. under attack / detected / evasion / AUROC"
                                                       for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for label in labels:
        cells, kind = [], ""
        for n in names:
            a = by_label[n].get(label)
            if a is None:
                cells.append("– (not in its suite)")
                continue
            kind = a["kind"]
            auroc = "–" if a.get("auroc") is None else f"{a['auroc']:.2f}"
            cells.append(f"{_pct(a.get('accuracy_under_attack'))} / **{_pct(a['detection']['rate'])}** / "
                         f"{_pct(a['evasion']['rate'])} / {auroc}" + (" (seen in fitting)" if label in seen[n] else ""))
        lines.append(f"| {label} | {kind} | " + " | ".join(cells) + " |")
    if any(label in seen[n] for n in names for label in by_label[n]):
        lines += ["", SEEN_IN_FITTING]
    if len({ev.get("held_out_draw") or OLD_DRAW for ev in evaluations.values()}) > 1:
        lines += ["", "These evaluations drew their held-out images differently, or one does not record how: an "
                      "older draw holds more of the "
                      "classifier's mistakes, so rates over all images (clean false positives on all, natural "
                      "shifts, accuracy) are not comparable between them; rates on correct images and on "
                      "successful adversarials are."]
    if labels and all("margin_quantile" in ev["clean"] for ev in evaluations.values()):
        lines += ["", "| attack | " + " | ".join(f"{n}: median landing margin / beyond clean / detected beyond / "
                                                  f"detected within" for n in names) + " |",
                  "|---|" + "---|" * len(names),
                  "| clean (correct images): median margin / 95th percentile | " + " | ".join(
                      f"{_num(ev['clean']['median_margin'], 3)} / {_num(ev['clean']['margin_quantile']['value'], 3)}"
                      for ev in evaluations.values()) + " |"]
        for label in labels:
            cells = []
            for n in names:
                a = by_label[n].get(label)
                cells.append("–" if a is None or "beyond_clean" not in a else
                             f"{_num(a['median_margin'], 3)} / {_pct(a['beyond_clean']['rate'])} / "
                             f"{_pct(a['detection_beyond']['rate'])} / {_pct(a['detection_within']['rate'])}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    shifts = [s["name"] for s in first.get("shifts", [])]
    if shifts and all([s["name"] for s in ev.get("shifts", [])] == shifts for ev in evaluations.values()):
        lines += ["", "| natural shift | " + " | ".join(f"{n}: flagged / accuracy" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for i, name in enumerate(shifts):
            lines.append(f"| {name} | " + " | ".join(
                f"{_pct(evaluations[n]['shifts'][i]['flagged']['rate'])} / "
                f"{_pct(evaluations[n]['shifts'][i]['accuracy'])}" for n in names) + " |")
    if matched_fpr is not None:  # last: every table above is at each detector's own threshold
        matched = {n: matched_detection(ev, matched_fpr) for n, ev in evaluations.items()}
        lines += ["", f"Thresholded anew at {matched_fpr:.1%} of the held-out clean (correct) images flagged:", "",
                  "| attack or shift | " + " | ".join(f"{n}: detected" for n in names) + " |",
                  "|---|" + "---|" * len(names),
                  "| clean flagged (correct images) | " + " | ".join(_pct(matched[n][0]) for n in names) + " |"]
        shift_names = dict.fromkeys(s["name"] for ev in evaluations.values() for s in ev.get("shifts", []))
        for title, key in [(label, label) for label in labels] + [(f"{s} (flagged)", s) for s in shift_names]:
            lines.append(f"| {title} | " + " | ".join(
                "–" if key not in matched[n][1] else _pct(matched[n][1][key]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("evaluations", nargs="+", help="evaluation.json files or the folders detector-evaluate wrote")
    p.add_argument("--names", nargs="+", help="a name per evaluation (default: the folder names)")
    p.add_argument("--groups", nargs="+", default=["all attacks", "minimal"],
                   help="attack groups drawn in the plot")
    p.add_argument("--out", help="write the plot of evasion rate against budget here (PNG)")
    p.add_argument("--matched-fpr", type=float, default=None, metavar="SHARE",
                   help="also give each attack's detection with every detector thresholded anew at this share "
                        "of its held-out clean images flagged (e.g. 0.05)")
    p.add_argument("--up-to", type=float, default=None, metavar="LEVELS",
                   help="end the plot's budget axis here, in /255 (default: the largest budget)")
    args = p.parse_args(argv)
    names = args.names or [_name(e) for e in args.evaluations]
    if len(names) != len(args.evaluations):
        p.error("give one name per evaluation")
    if len(set(names)) != len(names):
        p.error(f"two evaluations would share the column name {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                f"give --names")
    try:
        evaluations = {n: load(e) for n, e in zip(names, args.evaluations)}
        if args.matched_fpr is not None and not 0.0 <= args.matched_fpr < 1.0:
            raise ValueError(f"--matched-fpr must lie in [0, 1), got {args.matched_fpr}")
        if args.up_to is not None and not (math.isfinite(args.up_to) and args.up_to > 0):
            raise ValueError(f"--up-to must be a budget above 0 (in /255), got {args.up_to}")
        table = side_by_side(evaluations, args.matched_fpr)
    except (OSError, ValueError, KeyError, PipelineError) as exc:
        p.exit(2, f"python -m training.robustness: error: {exc}\n")
    curves = {f"{n}, {g}": groups[g]["per_input_linf"] for n, ev in evaluations.items()
              for groups in [ev.get("evasion_budget", {}).get("groups", {})] for g in args.groups if g in groups}
    if args.out and not curves:  # shifts-only evaluations, or groups none of them has
        p.exit(2, f"python -m training.robustness: error: --out: no evaluation has an evasion budget for "
                  f"{', '.join(args.groups)} (the shifts suite runs no attack): nothing to plot\n")
    print(table)
    if args.out:
        args.out = args.out if Path(args.out).suffix else args.out + ".png"
        plot_evasion_budget(Path(args.out), curves, "evasion rate against L∞ budget: " + " vs ".join(names),
                            up_to=args.up_to)
        print(f"plot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
