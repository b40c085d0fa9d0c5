"""The training pipeline, stage by stage: prepare the data and classifier (:mod:`.prepare`), attack
along a recorded PGD path (:mod:`.attacking`), fit the detector (:mod:`.fitting`), evaluate it on
held-out images, and write the bundle, the report and the plots (:mod:`.output`, :mod:`.report`).

:func:`run` is the whole pipeline (``detector-train``).  Nothing here computes ψ, κ or PGD itself:
those come from :mod:`detector`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from detector import Bundle, UncannyValleyDetector, distributed, save_bundle
from detector.estimator import DETECTORS, ESTIMATORS
from detector.evaluation import HELD_OUT_DRAW, attack_suite, evaluate, held_out_images
from detector.metrics import roc_rates, wilson_interval
from detector.shifts import shift_name

from .attacking import (
    attack_paths,
    path_statistics,
    sample_correct,
    top_up_calibration,
    trajectory_summary,
)
from .fitting import (
    CLEAN_VARIANTS,
    FIT_SOURCES,
    DetectorSet,
    balanced_side,
    fit_detector,
    fit_sources,
    seen_in_fitting,
    split_calibration,
    split_images,
)
from .options import (
    PAPER_ATTACK,
    PipelineError,
    TrainOptions,
    attack_settings,
    resolve_device,
)
from .output import (
    check_out_dir,
    dump_json,
    json_safe,
    log,
    machine_info,
    publish,
    staging_dir,
)
from .prepare import prepare

__all__ = ["PipelineError", "TrainOptions", "evaluate_detector", "run"]

#: Fewest successful adversarials each side of the split needs for a meaningful fit / evaluation.
MIN_ADVERSARIAL_PER_SIDE = 2
#: Fewest clean calibration and held-out images the attack-suite evaluation runs on.
MIN_EVALUATION_IMAGES = 20
SPLIT = "split.json"


# ---------------------------------------------------------------------------------------------
# Detector set, split, evaluation


def evaluate_detector(detector: UncannyValleyDetector, held_out: DetectorSet) -> tuple[dict[str, Any], dict]:
    """Metrics on the held-out part, and the curves the plots need."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        roc_auc_score,
        roc_curve,
    )

    y = held_out.is_adv
    score = detector.score_samples(held_out.rows)
    pred = detector.predict(held_out.rows)
    fpr, tpr, _ = roc_curve(y, score)
    tpr_at, tnr_at = roc_rates(fpr, tpr)
    k_fpr, k_tpr, _ = roc_curve(y, held_out.kappa)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    metrics = {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "auroc": float(roc_auc_score(y, score)),
        "tpr_at_5_fpr": tpr_at,
        "tnr_at_95_tpr": tnr_at,
        "tpr": float(tp / max(tp + fn, 1)),
        "fpr": float(fp / max(fp + tn, 1)),
        "tpr_interval": list(wilson_interval(int(tp), int(tp + fn))),
        "fpr_interval": list(wilson_interval(int(fp), int(fp + tn))),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "n_test": int(len(y)),
        "n_test_adversarial": int(y.sum()),
        # κ alone as the score: below 0.5 means adversarials are flatter than clean inputs.
        "kappa_auroc": float(roc_auc_score(y, held_out.kappa)),
    }
    curves = {"roc": (fpr, tpr), "kappa_roc": (k_fpr, k_tpr)}
    return metrics, curves


# ---------------------------------------------------------------------------------------------
# The pipeline


def run(options: TrainOptions) -> dict[str, Any]:
    """Train (or load) the classifier, attack, fit and evaluate the detector, write everything to
    ``options.out``; returns the report (also written as ``report.json``)."""
    from . import (
        report as reporting,  # matplotlib: only when a report is written, not on import
    )

    total_start = time.perf_counter()
    attack = attack_settings(options)
    if options.max_samples < 2:
        raise PipelineError("--max-samples must be at least 2")
    try:
        split_images(2, options.test_fraction, 0)  # validates the fraction before any work
    except ValueError as exc:
        raise PipelineError(str(exc)) from exc
    if options.detector not in DETECTORS:
        raise PipelineError(f"--detector must be one of {sorted(DETECTORS)}, got {options.detector!r}")
    if options.estimator is not None and options.estimator not in ESTIMATORS:
        raise PipelineError(f"--estimator must be one of {sorted(ESTIMATORS)}, got {options.estimator!r}")
    if not 0.0 <= options.target_fpr < 1.0 or not 0.0 < options.calibration_fraction < 1.0:
        raise PipelineError("--target-fpr must lie in [0, 1) and --calibration-fraction in (0, 1)")
    if options.calibration_images < 0:
        raise PipelineError(f"--calibration-images must be 0 or more, got {options.calibration_images}")
    if isinstance(options.clean_variants, str):
        raise PipelineError("clean_variants is a sequence of names, not one string")
    clean_variants = CLEAN_VARIANTS if options.clean_variants is None else tuple(options.clean_variants)
    if options.clean_variants and options.detector == "paper":
        raise PipelineError("--clean-variants is for detectors with an operating point; the paper's tree is "
                            "fitted on clean images and PGD's final iterates only")
    try:
        clean_variants = tuple(dict.fromkeys(shift_name(name) for name in clean_variants))
    except ValueError as exc:
        raise PipelineError(f"--clean-variants: {exc}") from exc
    if isinstance(options.fit_attacks, str):
        raise PipelineError("fit_attacks is a sequence of names, not one string")
    if options.fit_attacks is not None and options.detector == "paper":
        raise PipelineError("--fit-attacks is for detectors fitted on both phases of the path; the paper's tree "
                            "is fitted on PGD's final iterates only")
    try:
        sources = FIT_SOURCES if options.fit_attacks is None else fit_sources(options.fit_attacks)
    except ValueError as exc:
        raise PipelineError(f"--fit-attacks {exc}") from exc
    if options.evaluate not in ("none", "quick", "full"):
        raise PipelineError(f"--evaluate must be none, quick or full, got {options.evaluate!r}")
    check_out_dir(Path(options.out))
    distributed.init(resolve_device(options.device))  # under torchrun: join the other ranks
    prepared = prepare(options)
    model, device, timing = prepared.model, prepared.device, prepared.timing

    start = time.perf_counter()
    index = distributed.broadcast(sample_correct(prepared.test_correct, options.max_samples, options.seed))
    if len(index) < 2 * MIN_ADVERSARIAL_PER_SIDE:
        raise PipelineError(f"the classifier gets only {len(index)} test images right; train it longer")
    attacked = attack_paths(model, prepared.test, index, attack, layer=prepared.layer, device=device,
                            batch_size=options.batch_size, seed=options.seed, progress=options.progress)
    timing["attack"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_images, test_images = split_images(len(index), options.test_fraction, options.seed)
    fit_images, calibration_images = split_calibration(fit_images, options.calibration_fraction, options.seed)
    for name, images in (("fit", fit_images), ("held-out", test_images)):
        n_adv = int(attacked.success[images].sum())
        if n_adv < MIN_ADVERSARIAL_PER_SIDE:
            raise PipelineError(
                f"only {n_adv} successful adversarials on the {name} side "
                f"(attack success {attacked.success.mean():.1%} of {len(index)}): raise --eps/--steps "
                f"or --max-samples")
    if len(calibration_images) < 1:
        raise PipelineError("no calibration images: raise --max-samples or --calibration-fraction")
    used = np.concatenate([attacked.index[fit_images], attacked.index[calibration_images]])
    # Rank 0's draw on every rank: the draw follows each rank's own predictions.  The evaluation's images
    # are set apart even with --evaluate none, so that the calibration images below, and the operating
    # point they set, are the same whether or not the suite runs.
    pool = distributed.broadcast(held_out_images(prepared.test_correct, used, options.evaluate_images,
                                                 np.random.default_rng(options.seed + 3)))
    # More clean calibration images from outside the attacked and evaluated ones: the operating point is a
    # quantile, and a few hundred images set it only to within a few points of the target.  The paper's
    # tree has no operating point.
    wanted = options.calibration_images - len(calibration_images) if options.detector != "paper" else 0
    topped_up = distributed.broadcast(top_up_calibration(prepared.test_correct, np.concatenate([index, pool]),
                                                         wanted, options.seed))
    calibration_index = np.concatenate([attacked.index[calibration_images], topped_up])
    used = np.concatenate([used, topped_up])
    fitted = fit_detector(options.detector, model, prepared.test, attacked, fit_images, calibration_index,
                          pgd_params={k: getattr(attack, k) for k in ("eps", "alpha", "steps", "norm", "random_start")},
                          target_fpr=options.target_fpr if options.detector != "paper" else None,
                          layer=prepared.layer, device=device, batch_size=options.batch_size, seed=options.seed,
                          reference=prepared.train, estimator=options.estimator, clean_variants=clean_variants,
                          fit_sources=sources)
    # Every rank fitted on the same rows; rank 0's detector is the one saved, so all ranks use it.
    detector, fit_set = distributed.broadcast(fitted.detector), fitted.fit_set
    held_out = balanced_side(attacked, test_images, np.random.default_rng(options.seed + 2), fitted.path_rows)
    if np.intersect1d(held_out.image, np.concatenate([fit_images, calibration_images])).size:
        raise AssertionError("held-out rows come from images the detector was fitted or calibrated on")
    timing["detector_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    metrics, curves = evaluate_detector(detector, held_out)
    adv_rows = held_out.is_adv == 1
    detection = detector.detect(held_out.rows[adv_rows], held_out.kappa[adv_rows])
    clean_rows = ~adv_rows
    stats = path_statistics(attacked)
    successful_test = test_images[attacked.success[test_images]]
    detection_rate = [float(detector.predict(fitted.path_rows[successful_test, t]).mean())
                      for t in range(attack.steps + 1)]
    detection_rate_all = [float(detector.predict(fitted.path_rows[test_images, t]).mean())
                          for t in range(attack.steps + 1)]
    timing["evaluation"] = time.perf_counter() - start
    warnings = run_warnings(prepared.info["classifier"]["clean_accuracy"], prepared.test.num_classes, metrics,
                            detector.operating_threshold)
    for warning in warnings:
        log(f"warning: {warning}")

    report: dict[str, Any] = {
        "version": 1,
        "command": options.command,
        "options": asdict(options),
        **prepared.info,
        "attack": {
            **attack.to_dict(),
            "n_attacked": int(len(index)),
            "attacked_from": "test split, correctly classified images only",
            "success_rate": float(attacked.success.mean()),
            "n_successful": int(attacked.success.sum()),
            "max_linf": float(attacked.linf.max()),
            "mean_l2": float(attacked.l2.mean()),
        },
        "detection": {
            **metrics,
            "detector": options.detector,
            **detector.reads(),
            "estimator": repr(detector.estimator_),
            **_estimator_size(detector.estimator_),
            "threshold": float(detector.operating_threshold),
            "target_fpr": detector.target_fpr,
            "calibration_fpr": getattr(detector, "calibration_fpr_", None),
            "calibration_fpr_as_given": getattr(detector, "calibration_fpr_as_given_", None),
            "n_calibration": getattr(detector, "n_calibration_", None),
            "fitted_on": fitted.described,
            "n_fit": int(len(fit_set.is_adv)),
            "n_fit_adversarial": int(fit_set.is_adv.sum()),
            "n_fit_images": int(len(fit_images)),
            "n_calibration_images": int(len(calibration_index)),
            "n_calibration_not_attacked": int(len(topped_up)),
            "n_test_images": int(len(test_images)),
            "split": "by image: a clean image and its adversarial are always on the same side",
        },
        "valley": {
            "threshold": float(detector.valley_threshold_),
            "quantile": float(detector.valley_quantile),
            "calibrated_on": "kappa of the clean images of the fit part",
            "fraction": float(detection.uncanny_valley.mean()),
            "fraction_flat": float((held_out.kappa[adv_rows] <= detector.valley_threshold_).mean()),
            "clean_fraction_flat": float((held_out.kappa[clean_rows] <= detector.valley_threshold_).mean()),
            "median_kappa_clean": float(np.median(held_out.kappa[clean_rows])),
            "median_kappa_adversarial": float(np.median(held_out.kappa[adv_rows])),
        },
        "trajectory": {
            **stats,
            "over": "all attacked images (successful or not)",
            **trajectory_summary(stats),
            "mean_sharpness_successful": path_statistics(attacked, np.flatnonzero(attacked.success))["mean_sharpness"],
            "detection_rate": detection_rate,
            "detection_rate_over": "held-out images whose attack succeeded",
            "detection_rate_all_attacked": detection_rate_all,
        },
        "machine": machine_info(device),
        "warnings": warnings,
    }

    origin = prepared.test_origin
    evaluation = None
    if options.evaluate != "none" and min(len(calibration_index), len(pool)) < MIN_EVALUATION_IMAGES:
        warnings.append(f"attack suite skipped: {len(calibration_index)} calibration and {len(pool)} held-out "
                        f"images, at least {MIN_EVALUATION_IMAGES} of each are needed (raise --max-samples "
                        f"or --test-samples)")
        log(f"warning: {warnings[-1]}")
    elif options.evaluate != "none":
        start = time.perf_counter()
        in_memory = Bundle(model.eval(), detector, prepared.train.classes, prepared.input_spec,
                           prepared.architecture, prepared.model_config, prepared.layer, Path(options.out), "")
        evaluation = evaluate(
            in_memory, prepared.test, pool, excluded=used, calibration=calibration_index,
            suite=attack_suite(attack.eps if attack.norm == "linf" else PAPER_ATTACK["eps"],
                               int(np.prod(prepared.test.input_shape)), options.evaluate, options.seed),
            reference=prepared.train, target_fpr=options.target_fpr, batch_size=options.batch_size,
            seed=options.seed, progress=options.progress, held_out_draw=HELD_OUT_DRAW).to_dict()
        evaluation["detector"] = {"name": options.detector, **evaluation["detector"]}
        evaluation["seen_in_fitting"] = seen_in_fitting(report, evaluation["attacks"])
        suite_eps = attack.eps if attack.norm == "linf" else PAPER_ATTACK["eps"]
        evaluation["radius_scale"] = suite_eps / PAPER_ATTACK["eps"]
        evaluation["suite"] = options.evaluate
        evaluation = json_safe(remap_ids(evaluation, origin))
        report["evaluation"] = summarize_evaluation(evaluation)
        timing["attack_suite"] = time.perf_counter() - start

    if not distributed.is_main():  # rank 0 writes the bundle; the others have done their share
        model.to(device)
        distributed.barrier()
        return json_safe(report)
    start = time.perf_counter()
    out = Path(options.out)
    stage = staging_dir(out)
    try:
        plots = reporting.write_plots(stage, report, attacked=attacked, held_out=held_out, curves=curves)
        split = {
            "about": "positions in the test split of the images each part of the detector saw",
            "fit": origin[attacked.index[fit_images]].tolist(),
            "calibration": origin[np.sort(calibration_index)].tolist(),
            "held_out": origin[attacked.index[test_images]].tolist(),
            # The image behind every row the report's detection metrics were computed on.
            "held_out_rows": origin[attacked.index[held_out.image]].tolist(),
        }
        if evaluation is not None:
            split["evaluated"] = evaluation["image_ids"]["evaluated"]
        dump_json(stage / SPLIT, split)
        report["files"] = {**plots, "split": SPLIT}
        if evaluation is not None:
            report["files"].update(reporting.write_evaluation(stage, evaluation, title=reporting.figure_title(report)))
        timing["report"] = time.perf_counter() - start
        timing["total"] = time.perf_counter() - total_start
        report["timing"] = {"seconds": {k: round(v, 3) for k, v in timing.items()}}
        report = json_safe(report)
        reporting.write_markdown(stage / "report.md", report)
        save_bundle(stage, model=model.cpu(), architecture=prepared.architecture, detector=detector,
                    classes=prepared.train.classes, input_spec=prepared.input_spec,
                    model_config=prepared.model_config, layer=prepared.layer, report=report)
        publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    model.to(device)
    distributed.barrier()
    return report


def remap_ids(evaluation: dict[str, Any], origin: np.ndarray) -> dict[str, Any]:
    """Image ids of an evaluation on a subset of the test split, as positions in the whole split."""
    evaluation = dict(evaluation)
    evaluation["image_ids"] = {k: origin[np.asarray(v, dtype=np.int64)].tolist()
                               for k, v in evaluation["image_ids"].items()}
    evaluation["attacks"] = [{**a, "image_ids": origin[np.asarray(a["image_ids"], dtype=np.int64)].tolist()}
                             for a in evaluation["attacks"]]
    return evaluation


#: Per-row arrays of an attack record: in evaluation.json, not in report.json or /model.
PER_ROW = ("image_ids", "scores", "margins", "linf", "l2", "evaded")


def budget_without_rows(budget: dict[str, Any]) -> dict[str, Any]:
    """The evasion-budget section without its per-input lists."""
    if not budget:
        return {}
    return {**budget, "groups": {name: {k: v for k, v in group.items() if not k.startswith("per_input")}
                                 for name, group in budget["groups"].items()}}


def summarize_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation without its per-row arrays: what report.json and /model carry."""
    return {
        "detector": evaluation["detector"],
        "target_fpr": evaluation["target_fpr"],
        "clean": {k: v for k, v in evaluation["clean"].items() if k not in ("scores_correct", "margins_correct")},
        "attacks": [{k: v for k, v in a.items() if k not in PER_ROW} for a in evaluation["attacks"]],
        "shifts": [{k: v for k, v in s.items() if k != "scores"} for s in evaluation["shifts"]],
        "evasion_budget": budget_without_rows(evaluation.get("evasion_budget", {})),
        "n_evaluated": len(evaluation["image_ids"]["evaluated"]),
        "radius_scale": evaluation.get("radius_scale", 1.0),
        "seen_in_fitting": evaluation.get("seen_in_fitting", []),
        "suite": evaluation.get("suite"),
        "held_out_draw": evaluation.get("held_out_draw"),
    }


def _estimator_size(estimator) -> dict[str, int]:
    if hasattr(estimator, "get_depth"):
        return {"tree_depth": int(estimator.get_depth()), "tree_leaves": int(estimator.get_n_leaves())}
    if hasattr(estimator, "n_iter_"):
        return {"boosting_iterations": int(estimator.n_iter_)}
    return {}


#: Below this many held-out adversarials (or clean images), rates swing by more than ±10 points.
SMALL_SET = 100


def run_warnings(accuracy: float, num_classes: int, metrics: dict[str, Any], threshold: float) -> list[str]:
    """What a user should know before trusting the figures: a classifier near chance, a held-out set too
    small to trust, an operating point that flags nothing."""
    warnings = []
    chance = 1.0 / num_classes
    # Twice chance, but never above a tenth of the way from chance to perfect (two classes: 55%, not 100%).
    if accuracy < min(2.0 * chance, chance + 0.1 * (1.0 - chance)):
        warnings.append(f"the classifier is near chance ({accuracy:.1%} clean accuracy, {num_classes} classes): "
                        f"train it longer (--epochs) before trusting the detector")
    n_adv = metrics["n_test_adversarial"]
    if n_adv < SMALL_SET:
        low, high = metrics["tpr_interval"]
        warnings.append(f"only {n_adv} held-out adversarials: the detection rate is known to "
                        f"{low:.0%}–{high:.0%} (95%); raise --max-samples")
    # Scores are probabilities: above 1 nothing is ever flagged (more than the target share of clean
    # calibration images scored exactly 1, so no threshold keeps to the target and flags anything).
    if threshold > 1.0:
        warnings.append("the operating point flags nothing: too many clean calibration images score 1.0 "
                        "(raise --target-fpr or fit on more images)")
    return warnings
