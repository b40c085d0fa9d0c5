"""Plots (PNG), ``report.md`` and the one-screen terminal summary of a training run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detector.layers import GRAM_LAYERS_IN_WORDS, probes_in_words  # noqa: E402
from detector.metrics import budget_summary  # noqa: E402

__all__ = [
    "FIGURE1",
    "evaluation_markdown",
    "write_evaluation",
    "plot_trajectory",
    "summary_text",
    "write_markdown",
    "write_plots",
    "write_trajectory_csv",
]

FIGURE1 = "figure1_trajectory.png"
ROC = "roc.png"
DISTRIBUTIONS = "distributions.png"

CSV_COLUMNS = (
    "step", "mean_sharpness", "std_sharpness", "q10_sharpness", "q25_sharpness", "median_sharpness",
    "q75_sharpness", "q90_sharpness", "mean_loss", "std_loss", "q25_loss", "median_loss", "q75_loss",
    "misclassified_fraction",
)


def _band(ax, steps, stats: dict, name: str, color: str, label: str) -> None:
    ax.fill_between(steps, stats[f"q10_{name}"], stats[f"q90_{name}"], color=color, alpha=0.12,
                    linewidth=0, label="10–90% of inputs")
    ax.fill_between(steps, stats[f"q25_{name}"], stats[f"q75_{name}"], color=color, alpha=0.25,
                    linewidth=0, label="25–75% of inputs")
    ax.plot(steps, stats[f"median_{name}"], color=color, linestyle="--", linewidth=1.2, label="median")
    ax.plot(steps, stats[f"mean_{name}"], color=color, marker="o", markersize=3.5, linewidth=2, label=label)


def plot_trajectory(path: Path, stats: dict[str, Any], *, title: str,
                    detection_rate: list[float] | None = None) -> None:
    """The paper's Figure 1: κ and the loss along the PGD path (mean, median and spread over the
    attacked inputs), with the share of misclassified (and detector-flagged) inputs per step."""
    steps = np.asarray(stats["step"])
    panels = 3
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.0))
    ax = axes[0]
    _band(ax, steps, stats, "sharpness", "tab:red", "mean κ")
    ax.set_xlabel("PGD step t")
    ax.set_ylabel("relative sharpness κ = ‖W‖_F · Tr H")
    ax.set_title("sharpness along the attack")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax = axes[1]
    _band(ax, steps, stats, "loss", "tab:blue", "mean loss")
    ax.set_xlabel("PGD step t")
    ax.set_ylabel("cross-entropy loss (true label)")
    ax.set_title("loss along the attack")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, stats["misclassified_fraction"], color="black", marker="o", markersize=3.5,
            label="misclassified")
    if detection_rate is not None:
        ax.plot(steps, detection_rate, color="tab:green", marker="s", markersize=3.5,
                label="flagged by the detector (held out)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("PGD step t")
    ax.set_ylabel("share of inputs")
    ax.set_title("label flips and detection")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(steps if len(steps) <= 21 else np.linspace(steps[0], steps[-1], 11).round())
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_roc(path: Path, report: dict, curves: dict) -> None:
    fpr, tpr = curves["roc"]
    k_fpr, k_tpr = curves["kappa_roc"]
    det = report["detection"]
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(fpr, tpr, color="tab:green", linewidth=2,
            label=f"detector on {det.get('features', 'psi')} (AUROC {det['auroc']:.3f})")
    ax.plot(k_fpr, k_tpr, color="tab:red", linewidth=1.2, linestyle="--",
            label=f"κ alone as the score (AUROC {det['kappa_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.axvline(0.05, color="grey", linewidth=0.8)
    ax.scatter([0.05], [det["tpr_at_5_fpr"]], color="tab:green", zorder=3,
               label=f"TPR at 5% FPR = {det['tpr_at_5_fpr']:.3f}")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (adversarial flagged)")
    ax.set_title(f"held-out ROC, n = {det['n_test']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log10(values: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(values, 1e-12, None))


def _plot_distributions(path: Path, report: dict, held_out) -> None:
    clean = held_out.is_adv == 0
    adv = ~clean
    tau = report["valley"]["threshold"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.0))
    ax = axes[0]
    k = _log10(held_out.kappa)
    bins = np.linspace(k.min(), k.max(), 40)
    ax.hist(k[clean], bins=bins, alpha=0.6, color="tab:blue", label="clean")
    ax.hist(k[adv], bins=bins, alpha=0.6, color="tab:red", label="adversarial")
    ax.axvline(np.log10(max(tau, 1e-12)), color="black", linestyle="--", label=f"valley threshold τ = {tau:.3g}")
    ax.set_xlabel("log10 κ")
    ax.set_ylabel("held-out inputs")
    ax.set_title("relative sharpness κ")
    ax.legend(fontsize=8)
    ax = axes[1]
    m = _log10(held_out.psi.max(axis=1))
    bins = np.linspace(m.min(), m.max(), 40)
    ax.hist(m[clean], bins=bins, alpha=0.6, color="tab:blue", label="clean")
    ax.hist(m[adv], bins=bins, alpha=0.6, color="tab:red", label="adversarial")
    ax.set_xlabel("log10 max_j ψ_j")
    ax.set_title("largest component of ψ")
    ax.legend(fontsize=8)
    ax = axes[2]
    ranks = np.arange(1, held_out.psi.shape[1] + 1)
    for rows, color, label in ((clean, "tab:blue", "clean"), (adv, "tab:red", "adversarial")):
        ordered = _log10(-np.sort(-held_out.psi[rows], axis=1))
        q25, med, q75 = np.quantile(ordered, [0.25, 0.5, 0.75], axis=0)
        ax.fill_between(ranks, q25, q75, color=color, alpha=0.2, linewidth=0)
        ax.plot(ranks, med, color=color, marker="o", markersize=3, label=f"{label} (median, 25–75%)")
    ax.set_xlabel("rank of ψ_j (largest first)")
    ax.set_ylabel("log10 ψ_j")
    ax.set_title("shape of ψ, components sorted")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"held-out ψ and κ, clean vs adversarial ({int(clean.sum())} + {int(adv.sum())})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_title(report: dict) -> str:
    c, a = report["classifier"], report["attack"]
    norm = "L∞" if a["norm"] == "linf" else "L2"
    return (f"{c['architecture']} on {report['data']['spec']} (clean acc {c['clean_accuracy']:.1%}); "
            f"PGD-{a['steps']} {norm} ε={pixel_value(a['eps'])} α={pixel_value(a['alpha'])}, "
            f"{a['n_attacked']} inputs, success {a['success_rate']:.1%}")


def write_plots(out: Path, report: dict, *, attacked, held_out, curves: dict) -> dict[str, str]:
    """Figure 1, the ROC curve and the ψ/κ distributions; returns ``{plot: file name}``."""
    plot_trajectory(out / FIGURE1, report["trajectory"], title=figure_title(report),
                    detection_rate=report["trajectory"]["detection_rate"])
    _plot_roc(out / ROC, report, curves)
    _plot_distributions(out / DISTRIBUTIONS, report, held_out)
    write_trajectory_csv(out / "trajectory.csv", report["trajectory"])
    return {"figure1": FIGURE1, "roc": ROC, "distributions": DISTRIBUTIONS, "trajectory_csv": "trajectory.csv"}


def write_trajectory_csv(path: Path, stats: dict[str, Any], extra: dict[str, list[float]] | None = None) -> None:
    """One row per PGD step: κ and loss statistics, misclassified share (and ``extra`` columns)."""
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    columns = list(CSV_COLUMNS) + list(extra)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for t in range(len(stats["step"])):
            row = [stats[c][t] if c in stats else extra[c][t] for c in columns]
            writer.writerow([v if isinstance(v, int) else f"{v:.6g}" for v in row])


def pixel_value(value: float) -> str:
    """ε or α as people write them: a short decimal as it is (``0.2``), ``8/255`` when the value is
    a whole number of 8-bit levels that has no short decimal form, else four significant digits."""
    short = f"{value:.4g}"
    if float(short) == value:
        return short
    levels = value * 255
    if abs(levels - round(levels)) < 1e-6 and round(levels) > 0:
        return f"{round(levels)}/255"
    if abs(levels * 2 - round(levels * 2)) < 1e-6 and round(levels * 2) > 0:
        return f"{levels:g}/255"
    return short


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _described(det: dict, side: str) -> str:
    fitted = det.get("fitted_on", {}).get(side)
    if isinstance(fitted, dict):
        return ", ".join(f"{k} {v}" for k, v in fitted.items())
    return str(fitted) if fitted else "n/a"


def _adversarial_training_rows(c: dict) -> list[str]:
    at = c.get("adversarial_training")
    if not at:
        return []
    probe = " → ".join(_pct(h["probe_pgd10_accuracy"]) for h in at["history"] if "probe_pgd10_accuracy" in h)
    rows = [f"| adversarial training | {at['described']}; PGD-10 accuracy on training images per epoch: {probe} |"]
    if at.get("stopped"):
        rows.append(f"| stopped early | {at['stopped']} |")
    return rows


def _robust_accuracy_rows(c: dict) -> list[str]:
    r = c.get("robust_accuracy")
    if not r:
        return []
    return [f"| **robust accuracy (test)** | **{_pct(r['accuracy'])}** under {r['attack']}, {r['n']} images |"]


def write_markdown(path: Path, report: dict) -> None:
    """A human-readable report: settings, figures, the per-step table, timing, machine."""
    d, c, a = report["data"], report["classifier"], report["attack"]
    det, v, tr, m = report["detection"], report["valley"], report["trajectory"], report["machine"]
    seconds = report["timing"]["seconds"]
    norm = "L∞" if a["norm"] == "linf" else "L2"
    lines = [
        "# Uncanny-valley detector: training report",
        "",
        f"Command: `{report['command']}`" if report.get("command") else "Run through `training.pipeline.run`.",
        "",
        f"Machine: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} CPUs, device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; torch {m['torch']}, Python {m['python']}.",
        "",
        "## Classifier",
        "",
        "| | |",
        "|---|---|",
        f"| data | `{d['spec']}`: {d['source']}; {d['n_train']} train / {d['n_test']} test images "
        f"{'×'.join(map(str, d['input_shape']))}, {d['num_classes']} classes |",
        f"| architecture | `{c['architecture']}` {c['model_config'] or ''} ({c['parameters']:,} parameters)"
        f"{' — bring your own' if c['byo'] else ''} |",
        f"| weights | {c['weights'] or 'trained here'}; {c['epochs']} epochs"
        f"{' (' + c['recipe'] + ')' if c['recipe'] else ''} |",
        f"| normalisation | {c['normalisation']}: mean {[round(x, 4) for x in c['mean']]}, "
        f"std {[round(x, 4) for x in c['std']]} |",
        f"| output layer | {c['layer'] or 'last nn.Linear'} |",
        *_adversarial_training_rows(c),
        f"| **clean accuracy (test)** | **{_pct(c['clean_accuracy'])}** (train {_pct(c['train_accuracy'])}) |",
        *_robust_accuracy_rows(c),
        "",
        "## Attack",
        "",
        f"PGD, {norm}, ε = {pixel_value(a['eps'])}, α = {pixel_value(a['alpha'])}, {a['steps']} steps, "
        f"random start {'on' if a['random_start'] else 'off'} (defaults: {a['defaults']}). "
        f"Attacked {a['n_attacked']} images ({a['attacked_from']}); **success rate {_pct(a['success_rate'])}** "
        f"({a['n_successful']}). Largest L∞ perturbation {_num(a['max_linf'])}, mean L2 {_num(a['mean_l2'])}.",
        "",
        "## Detection (held out)",
        "",
        f"Detector `{det.get('detector', 'paper')}`: {det['estimator']} on `{det.get('features', 'psi')}` features{_probed(det)}, "
        f"fitted on {det['n_fit']} rows ({det['n_fit_adversarial']} adversarial: {_described(det, 'adversarial')}; "
        f"clean: {_described(det, 'clean')}) from {det['n_fit_images']} images; flagged at score ≥ "
        f"{_num(det['threshold'])}" + (f", set on {det.get('n_calibration')} clean calibration rows from "
                                      f"{det.get('n_calibration_images')} other images"
                                      + (f" ({det['n_calibration_not_attacked']} of them not attacked)"
                                         if det.get("n_calibration_not_attacked") else "")
                                      + f" for "
                                      f"{_pct(det['target_fpr'])} false positives (reached there: "
                                      f"{_pct(det.get('calibration_fpr'))}"
                                      + (f"; on the images as they came: {_pct(det['calibration_fpr_as_given'])}"
                                         if det.get("calibration_fpr_as_given") is not None else "")
                                      + ")" if det.get("target_fpr") is not None else "")
        + f". Evaluated on {det['n_test']} rows ({det['n_test_adversarial']} adversarial: the final PGD iterate) "
        f"from {det['n_test_images']} other images; split {det['split']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | **{_pct(det['accuracy'])}** |",
        f"| balanced accuracy | {_pct(det['balanced_accuracy'])} |",
        f"| AUROC | {_num(det['auroc'])} |",
        f"| TPR at 5% FPR | {_pct(det['tpr_at_5_fpr'])} |",
        f"| TNR at 95% TPR | {_pct(det['tnr_at_95_tpr'])} |",
        f"| TPR / FPR at the threshold | {_pct(det['tpr'])} / {_pct(det['fpr'])} |",
        f"| AUROC of κ alone (< 0.5: adversarials flatter) | {_num(det['kappa_auroc'])} |",
        "",
        "## Uncanny valley",
        "",
        f"Threshold τ = {_num(v['threshold'])} (quantile {v['quantile']} of {v['calibrated_on']}). "
        f"Held-out adversarials flagged and at least as flat as τ (in the valley): **{_pct(v['fraction'])}**; "
        f"adversarials with κ ≤ τ regardless of the flag: {_pct(v['fraction_flat'])} "
        f"(clean: {_pct(v['clean_fraction_flat'])}). Median κ clean {_num(v['median_kappa_clean'])}, "
        f"adversarial {_num(v['median_kappa_adversarial'])}.",
        "",
        f"Along the path (mean over {tr['over']}): κ peaks at step {tr['peak_step']}, "
        f"{_num(tr['rise'], 3)}× its clean value, and ends at {_num(tr['fall'], 3)}× the peak "
        f"({_num(tr['final_over_clean'], 3)}× clean).",
        "",
        f"![Figure 1]({report['files']['figure1']})",
        "",
        "| step | mean κ | median κ | mean loss | misclassified | flagged (held out, successful) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tr["step"]:
        lines.append(f"| {t} | {_num(tr['mean_sharpness'][t])} | {_num(tr['median_sharpness'][t])} | "
                     f"{_num(tr['mean_loss'][t])} | {_pct(tr['misclassified_fraction'][t])} | "
                     f"{_pct(tr['detection_rate'][t])} |")
    if report.get("warnings"):
        lines[4:4] = ["**Warnings**: " + " ".join(f"{w}." for w in report["warnings"]), ""]
    if "evaluation" in report:
        ev = report["evaluation"]
        command = report.get("evaluation_command")
        made_by = ([f"The {ev['suite']} suite" + (f", run by `{command}`." if command else "."), ""]
                   if ev.get("suite") else [])
        lines += ["", "## What it catches: the attack suite on held-out images", "",
                  *made_by, *evaluation_markdown(ev), "",
                  f"Plots and per-image ids: [{report['files']['evaluation_md']}]({report['files']['evaluation_md']}).",
                  ""]
    lines += [
        "",
        f"![ROC]({report['files']['roc']})",
        "",
        f"![distributions]({report['files']['distributions']})",
        "",
        "## Timing (seconds)",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {s:.1f} |" for k, s in seconds.items()],
        "",
    ]
    path.write_text("\n".join(lines))


def summary_text(report: dict, out: str | Path | None = None) -> str:
    """The one-screen summary printed at the end of ``detector-train``."""
    c, a, det, v, tr = (report["classifier"], report["attack"], report["detection"], report["valley"],
                        report["trajectory"])
    seconds = report["timing"]["seconds"]
    norm = "Linf" if a["norm"] == "linf" else "L2"
    kappa = " ".join(f"{x:.3g}" for x in tr["mean_sharpness"])
    lines = [
        "=" * 72,
        f"classifier   {c['architecture']} on {report['data']['spec']}  ({c['epochs']} epochs, "
        f"{report['machine']['device']})",
        f"             clean accuracy {_pct(c['clean_accuracy'])} on {report['data']['n_test']} test images"
        + (f"; robust {_pct(c['robust_accuracy']['accuracy'])} (PGD-10 at eps="
           f"{pixel_value(c['adversarial_training']['eps'])}, {c['adversarial_training']['kind']} adversarial "
           f"training)" if c.get("robust_accuracy") else ""),
        f"attack       PGD-{a['steps']} {norm} eps={pixel_value(a['eps'])} alpha={pixel_value(a['alpha'])}: "
        f"success {_pct(a['success_rate'])} of {a['n_attacked']}",
        f"detection    accuracy {_pct(det['accuracy'])}  balanced {_pct(det['balanced_accuracy'])}  "
        f"AUROC {det['auroc']:.3f}",
        f"             TPR@5%FPR {_pct(det['tpr_at_5_fpr'])}  TNR@95%TPR {_pct(det['tnr_at_95_tpr'])}  "
        f"(held out n={det['n_test']})",
        f"valley       tau={v['threshold']:.4g}  held-out adversarials in the valley {_pct(v['fraction'])}",
        f"kappa path   {kappa}",
        f"             peak at step {tr['peak_step']} ({tr['rise']:.2f}x clean), "
        f"final {tr['fall']:.2f}x peak",
        "flagged      " + " ".join(f"{x:.2f}" for x in tr["detection_rate"]),
        "time         " + ", ".join(f"{k} {s:.1f}s" for k, s in seconds.items()),
    ]
    if "evaluation" in report:
        ev = report["evaluation"]
        fp = ev["clean"]["false_positives_correct"]
        lines.insert(-1, f"suite        held-out clean flagged {_pct(fp['rate'])} (n={fp['n']}); "
                         f"detected / evasion / evasion budget L∞ per attack:")
        for a in ev["attacks"]:
            lines.insert(-1, f"             {a['label']:56s} {_pct(a['detection']['rate']):>6s} "
                             f"{_pct(a['evasion']['rate']):>6s} {_linf(a['evasion_budget_linf']):>9s}")
        for name, g in ev.get("evasion_budget", {}).get("groups", {}).items():
            if name in ("all attacks", "minimal"):
                li = g["linf"]
                median = ("beyond every attack" if li["median"] is None
                          else f"{budget_text(li['median'])} (quartiles {budget_text(li['q1'])} – "
                               f"{budget_text(li['q3'])})")
                lines.insert(-1, f"budget       {name[:12]:12s} L∞ to get past both: median {median}; "
                                 f"{_pct(li['evaded']['rate'])} of {li['n']} evaded at all, "
                                 f"at a median {budget_text(li['median_of_evaded'])}")
    for warning in report.get("warnings", []):
        lines.insert(-1, f"warning      {warning}")
    if out is not None:
        lines.append(f"written      {out}/ (bundle, report.json, report.md, plots)")
    lines.append("=" * 72)
    return "\n".join(lines)


# -- the attack-suite evaluation -------------------------------------------------------------------
EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
DETECTION_PLOT = "evaluation_detection.png"
ROC_PLOT = "evaluation_roc.png"
SCORES_PLOT = "evaluation_scores.png"
BUDGET_PLOT = "evaluation_budget.png"
EVALUATION_FILES = (EVALUATION_JSON, EVALUATION_MD, DETECTION_PLOT, ROC_PLOT, SCORES_PLOT, BUDGET_PLOT)


def _rate(r: dict | None) -> str:
    """``97.0% [92.1–99.0]``: a rate with its 95% interval."""
    if not r or r.get("n", 0) == 0 or r.get("rate") is None:
        return "n/a (none)"
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.0f}–{100 * r['high']:.0f}] of {r['n']}"


def _probed(det: dict) -> str:
    """What the detector reads from earlier layers, in words ("" for none)."""
    if not det.get("probes"):
        return ""
    extra = [what for key, what in (("probe_agreement", "their agreement with the output"),
                                    ("probe_means", "their channel means"),
                                    ("probe_gram", GRAM_LAYERS_IN_WORDS))
             if det.get(key)]
    if det.get("probe_rectified") and "their channel means" in extra:
        extra[extra.index("their channel means")] = "the channel means of their outputs clipped at zero"
    head = f" and the Mahalanobis distances of {probes_in_words(det['probes'], 'earlier layers')} and of φ"
    if len(extra) >= 2:
        return f"{head}, {', '.join(extra[:-1])} and {extra[-1]}"
    return head + "".join(f" and {what}" for what in extra)


#: What "(seen in fitting)" on an attack means, under every table that marks one.
SEEN_IN_FITTING = ("Seen in fitting: the detector was fitted on adversarials of other images made by this attack "
                   "with these parameters; no other attack was in its fitting set.")


def evaluation_markdown(evaluation: dict) -> list[str]:
    """The coverage tables: clean false positives, every attack, every natural shift."""
    det, clean = evaluation["detector"], evaluation["clean"]
    fpr = evaluation["target_fpr"]
    baselines = sorted({b for a in evaluation["attacks"] for b in a["baselines"]})
    named = f"`{det['name']}`, " if det.get("name") else ""  # --detector, where the bundle's report names it
    lines = [
        f"Detector: {named}`{det['features']}` features{_probed(det)}, {det['estimator']}, flagged at score ≥ "
        f"{_num(det['threshold'])}" + (f" (set for {_pct(det['target_fpr'])} false positives on clean calibration "
                                         f"images)" if det.get("target_fpr") is not None else " (fixed)") + ".",
        f"Evaluated on {clean['n']} held-out test images (clean accuracy {_pct(clean['accuracy'])}), none of them "
        f"seen in fitting or calibration. Baselines are thresholded at {_pct(fpr)} false positives on the same "
        f"calibration images.",
        *([f"Attacks are named by their CIFAR-10 radii (8/255 …); on these images every L∞ radius is "
           f"×{evaluation['radius_scale']:.3g} (the bundle's own ε is the 8/255 of the names), and perturbations "
           f"are given in 8-bit levels (/255)."] if abs(evaluation.get("radius_scale", 1.0) - 1.0) > 1e-6 else []),
        "",
        f"**Clean false positives**: {_rate(clean['false_positives_correct'])} of correctly classified images; "
        f"{_rate(clean['false_positives_all'])} of all. Baselines on correct images: "
        + ", ".join(f"{b} {_pct(r['rate'])}" for b, r in clean["baseline_false_positives_correct"].items()) + ".",
        "",
    ]
    seen = set(evaluation.get("seen_in_fitting", []))
    if not evaluation["attacks"]:
        return [*lines, "No attack was run (the shifts suite): clean false positives and natural shifts only.", "",
                *_shift_table(evaluation, seen)]
    lines += [
        "| attack | kind | accuracy under attack | success | detected (95% CI) | evasion | AUROC | median L∞ / L2 | "
        "evasion budget L∞ / L2 | " + " | ".join(f"{b}: det / AUROC" for b in baselines) + " |",
        "|---|---|---:|---|---|---|---:|---|---|" + "---|" * len(baselines),
    ]
    for a in evaluation["attacks"]:
        base = " | ".join(f"{_pct(a['baselines'][b]['detection'])} / {_num(a['baselines'][b]['auroc'], 3)}"
                          for b in baselines)
        label = f"{a['label']} (seen in fitting)" if a["label"] in seen else a["label"]
        lines.append(
            f"| {label} | {a['kind']} | {_pct(a.get('accuracy_under_attack'))} | {_pct(a['success']['rate'])} | "
            f"{_rate(a['detection'])} | "
            f"{_pct(a['evasion']['rate'])} | {_num(a['auroc'], 3)} | {_linf(a['median_linf'])} / "
            f"{_num(a['median_l2'], 3)} | {_linf(a['evasion_budget_linf'])} / {_num(a['evasion_budget_l2'], 3)} | "
            f"{base} |")
    if det.get("gradient") and any(a["attack"] == "score-descent" for a in evaluation["attacks"]):
        lines += ["", f"The descent on the detector's score followed {det['gradient']}."]
    lines += [
        "",
        "Accuracy under attack: share of all evaluated images classified correctly after the attack. Success: "
        "share of the attacked (correctly classified) images misclassified. Detected: share of the successful "
        "adversarials flagged. Evasion: share of attacked images misclassified and not flagged. Evasion budget "
        "(per attack): median perturbation of the successful adversarials that were not flagged."
        + (f" {SEEN_IN_FITTING}" if any(a["label"] in seen for a in evaluation["attacks"]) else ""),
        "",
        *landing_markdown(evaluation),
        *budget_markdown(evaluation.get("evasion_budget", {})),
        *_shift_table(evaluation, seen),
    ]
    return lines


def _shift_table(evaluation: dict, seen: set[str]) -> list[str]:
    if not evaluation["shifts"]:
        return []
    lines = ["| natural shift | flagged (all) | flagged (still correct) | accuracy |", "|---|---|---|---:|"]
    for sh in evaluation["shifts"]:
        name = f"{sh['name']} (seen in fitting)" if sh["name"] in seen else sh["name"]
        lines.append(f"| {name} | {_rate(sh['flagged'])} | {_rate(sh['flagged_correct'])} | "
                     f"{_pct(sh['accuracy'])} |")
    return lines


def landing_markdown(evaluation: dict) -> list[str]:
    """Where each attack's successful adversarials land beside clean images, and what is flagged of each
    part (empty for an evaluation written before landing margins were measured)."""
    clean = evaluation["clean"]
    cut = (clean.get("margin_quantile") or {}).get("value")
    attacks = [a for a in evaluation["attacks"] if "beyond_clean" in a]
    if cut is None or not attacks:
        return []
    q = clean["margin_quantile"]["quantile"]
    lines = [
        f"**Where the adversarials land**: the landing margin is the classifier's top logit minus the runner-up "
        f"on the adversarial (how far past the boundary its wrong answer is). Held-out clean, correctly "
        f"classified images: median {_num(clean['median_margin'], 3)}, {q:.0%} of them at or below "
        f"{_num(cut, 3)}. Beyond clean: a successful adversarial above that.",
        "",
        "| attack | median landing margin | beyond clean | detected beyond | detected within |",
        "|---|---:|---|---|---|",
    ]
    for a in attacks:
        lines.append(f"| {a['label']} | {_num(a['median_margin'], 3)} | {_rate(a['beyond_clean'])} | "
                     f"{_rate(a['detection_beyond'])} | {_rate(a['detection_within'])} |")
    return lines + [""]


def _linf(value: float | None) -> str:
    """An L∞ perturbation of [0, 1] pixels in 8-bit levels; n/a when there is none."""
    return "n/a" if value is None else f"{value * 255:.3g}/255"


def budget_text(value: float | None) -> str:
    """A budget in 8-bit levels (``3.5/255``); None: beyond every attack of the group."""
    return "not evaded" if value is None else _linf(value)


def budget_markdown(budget: dict) -> list[str]:
    """The evasion-budget table: per group of attacks, what it costs to get past both."""
    if not budget.get("groups"):
        return []
    lines = [
        "**Evasion budget**: for each attacked image, the smallest perturbation at which an attack of the group "
        "got it misclassified and unflagged (\"not evaded\": no attack of the group did; a quantile beyond "
        "them reads the same). Over all images: also the evaluated images the classifier already gets wrong "
        "and the detector does not flag, at 0.",
        "",
        "| attacks | images evaded | L∞ median [95% CI] | L∞ quartiles | L∞ median of the evaded | L2 median | "
        "L∞ median over all images |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, g in budget["groups"].items():
        li, l2 = g["linf"], g["l2"]
        low, high = li["median_interval"]
        lines.append(f"| {name} | {_rate(li['evaded'])} | **{budget_text(li['median'])}** [{budget_text(low)}–"
                     f"{budget_text(high)}] | {budget_text(li['q1'])} – {budget_text(li['q3'])} | "
                     f"{budget_text(li['median_of_evaded'])} | "
                     f"{_num(l2['median'], 3)} | "
                     f"{budget_text(g['linf_over_all']['median'])} |")
    return lines + [""]


def plot_evasion_budget(path: Path, curves: dict[str, list], title: str, *, up_to: float | None = None) -> None:
    """Evasion rate against L∞ budget (the share of attacked images an attacker gets past classifier and
    detector with at most that perturbation), one line per evaluation and group; budgets are per-input
    lists with None where no attack evaded.  ``up_to`` ends the axis there (in /255)."""
    budgets = {label: np.array([np.inf if v is None else v for v in values], dtype=np.float64) * 255
               for label, values in curves.items() if len(values)}
    finite = [b[np.isfinite(b)] for b in budgets.values()]
    right = max([1.0] + [float(f.max()) for f in finite if f.size]) * 1.05
    if up_to is not None:  # a closer look at small budgets (in 8-bit levels)
        right = float(up_to)
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for label, b in budgets.items():
        steps = np.sort(b[b <= right])
        x = np.r_[0.0, steps, right]  # flat after the last evasion on the axis
        y = np.r_[0.0, np.arange(1, steps.size + 1) / b.size, steps.size / b.size]
        ax.step(x, y, where="post", linewidth=1.3,
                label=f"{label} (median {budget_text(budget_summary(b / 255)['median'])})")
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1)
    ax.set_xlabel("budget: L∞ perturbation (/255)")
    ax.set_ylabel("evasion rate (misclassified and unflagged)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_detection(path: Path, evaluation: dict, title: str) -> None:
    attacks = evaluation["attacks"]
    labels = [a["label"] for a in attacks]
    y = np.arange(len(attacks))
    fig, ax = plt.subplots(figsize=(8.5, 0.38 * len(attacks) + 1.4))
    rate = np.array([a["detection"]["rate"] if a["detection"]["n"] else 0.0 for a in attacks])
    low = np.array([a["detection"]["low"] for a in attacks])
    high = np.array([a["detection"]["high"] for a in attacks])
    ax.barh(y, rate, color="tab:green", alpha=0.8, label="detected (of successful adversarials)")
    ax.errorbar(rate, y, xerr=[rate - np.minimum(low, rate), np.maximum(high, rate) - rate], fmt="none",
                ecolor="black", capsize=2, linewidth=0.8)
    ax.scatter([a["evasion"]["rate"] for a in attacks], y, color="tab:red", zorder=3, marker="x",
               label="evasion (misclassified, unflagged)")
    ax.axvline(evaluation["clean"]["false_positives_correct"]["rate"], color="grey", linestyle="--",
               linewidth=1, label="clean false positives")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)  # room for markers at exactly 1
    ax.set_xlabel("rate")
    ax.set_title(title, fontsize=8)
    # below the axes: inside, it would cover the bars and markers of whichever attacks sit under it
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes included
    plt.close(fig)


def _plot_attack_rocs(path: Path, evaluation: dict) -> None:
    from sklearn.metrics import roc_curve

    clean = np.asarray(evaluation["clean"]["scores_correct"])
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    for a in evaluation["attacks"]:
        adv = np.asarray(a["scores"])
        if adv.size == 0 or clean.size == 0:
            continue
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(clean.size), np.ones(adv.size)], np.r_[clean, adv])
        ax.plot(fpr, tpr, linewidth=1.1, label=f"{a['label']} ({a['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(evaluation["target_fpr"], color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate (clean, correct)")
    ax.set_ylabel("detection rate (successful adversarials)")
    ax.set_title("ROC of the detector's score per attack (AUROC)", fontsize=9)
    ax.legend(fontsize=5.5, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_scores(path: Path, evaluation: dict) -> None:
    clean = np.asarray(evaluation["clean"]["scores_correct"])
    attacks = [a for a in evaluation["attacks"] if a["scores"]]
    cols = 4
    rows = max(1, -(-len(attacks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    bins = np.linspace(0, 1, 26)
    threshold = evaluation["detector"]["threshold"]
    for ax, a in zip(axes.flat, attacks):
        ax.hist(clean, bins=bins, density=True, alpha=0.5, color="tab:blue", label="clean")
        ax.hist(a["scores"], bins=bins, density=True, alpha=0.5, color="tab:red", label="adversarial")
        if np.isfinite(threshold):
            ax.axvline(threshold, color="black", linewidth=0.8)
        ax.set_title(a["label"], fontsize=6)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("detector score: clean vs successful adversarials (line: threshold)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_evaluation(out: Path, evaluation: dict, *, title: str, command: str | None = None) -> dict[str, str]:
    """``evaluation.json``, ``evaluation.md`` and its plots in ``out``; returns their names."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / EVALUATION_JSON).write_text(json.dumps(evaluation, indent=1) + "\n")
    attacked = bool(evaluation["attacks"])  # the plots are per attack: none without one
    if attacked:
        _plot_detection(out / DETECTION_PLOT, evaluation, title)
        _plot_attack_rocs(out / ROC_PLOT, evaluation)
        _plot_scores(out / SCORES_PLOT, evaluation)
    groups = evaluation.get("evasion_budget", {}).get("groups", {})
    if groups:
        plot_evasion_budget(out / BUDGET_PLOT, {name: g["per_input_linf"] for name, g in groups.items()},
                     "evasion rate against budget, per group of attacks")
    lines = ["# Attack-suite evaluation", "", title, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += evaluation_markdown(evaluation)
    if attacked:
        lines += ["", f"![detection]({DETECTION_PLOT})", "", f"![ROC per attack]({ROC_PLOT})", "",
                  f"![scores]({SCORES_PLOT})", ""]
    if groups:
        lines += [f"![evasion rate against budget]({BUDGET_PLOT})", ""]
    lines += [f"Took {evaluation['seconds']:.0f} s.", ""]
    (out / EVALUATION_MD).write_text("\n".join(lines))
    files = {"evaluation": EVALUATION_JSON, "evaluation_md": EVALUATION_MD}
    if attacked:
        files.update(evaluation_detection=DETECTION_PLOT, evaluation_roc=ROC_PLOT, evaluation_scores=SCORES_PLOT)
    if groups:
        files["evaluation_budget"] = BUDGET_PLOT
    for name in set(EVALUATION_FILES) - set(files.values()):  # an earlier evaluation's plots written here
        (out / name).unlink(missing_ok=True)
    return files
