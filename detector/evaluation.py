"""Judging a bundle against an attack suite and natural shifts, on images it was not fitted on.

:func:`evaluate` is one loop over :func:`attack_suite`: every attack runs on the held-out images
the classifier gets right, and its successful adversarials are scored by the bundle's detector
(:meth:`~detector.bundle.Bundle.detect`, the service's own call) and, in the same table, by one-line
baselines (max-softmax, entropy, κ alone, Mahalanobis distance on φ), each thresholded on the same
held-out clean calibration images at the same false-positive rate.  Every rate carries a 95%
interval, and the image ids of every evaluated row are recorded and checked disjoint from the ids
the detector was fitted and calibrated on.

Per attack, the **landing margin** of each successful adversarial (its top logit minus the runner-up,
the classifier's margin on its wrong answer) is set beside the held-out clean images' margins, with
the detection rate of the adversarials that land beyond what clean images reach and of those that
land within it: whether the detector catches only attacks that overshoot into over-confidence, or
also those that stop among clean images (:func:`landing`).

Across the attacks, each input's **evasion budget** is the smallest perturbation (L∞ and L2) at which
any attack of the suite (or of one kind) got it misclassified and unflagged: what it costs an
attacker to get past classifier and detector together (:func:`evasion_budgets`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .attacks import get_attack
from .bundle import Bundle
from .datasets import ImageDataset
from .estimator import flagging_threshold
from .features import Analysis
from .layers import LayerGaussians
from .metrics import Rate, auroc, budget_summary, evasion_budget, evasion_rate, rate
from .shifts import SHIFTS, apply_shift
from .smoothing import split_temperature

__all__ = [
    "AttackRecord", "Evaluation", "ShiftRecord", "SuiteEntry", "attack_suite",
    "baseline_scores", "check_disjoint", "decision_for_attacker", "describe_gradient", "evaluate", "evasion_budgets",
    "HELD_OUT_DRAW", "held_out_images", "landing", "logit_margin", "same_attack",
]

BASELINES = ("max-softmax", "entropy", "kappa", "mahalanobis")

#: The landing margins above this quantile of the held-out clean (correct) images' margins count as
#: "beyond clean": further past the boundary than all but 5% of clean inputs.
LANDING_QUANTILE = 0.95

#: Recorded in every evaluation whose images :func:`held_out_images` drew (evaluations without it
#: drew them uniformly from the images left over, with more of the classifier's mistakes).
HELD_OUT_DRAW = "the split's share of mistakes"


@dataclass(frozen=True)
class SuiteEntry:
    """One attack of the suite: a registered attack with its parameters."""

    label: str
    attack: str
    params: dict[str, Any]
    level: str  # "quick": in every run; "full": only in the full suite


#: What a suite runs: ``quick`` and ``full`` attacks, or (``shifts``) none: clean images and natural shifts only.
SUITE_LEVELS = ("quick", "full", "shifts")


def attack_suite(eps: float = 8 / 255, input_dims: int = 3 * 32 * 32, level: str = "quick",
                 seed: int = 0) -> list[SuiteEntry]:
    """The suite, with L∞ radii scaled to the data by ``eps`` (the bundle's own PGD radius).

    Labels name the CIFAR radii (8/255 …); on other data every radius is multiplied by
    ``eps / (8/255)`` (6.4 on digits, whose default ε is 0.2), and the L2 radius 0.5 is scaled by
    the same factor and by √(input_dims / 3072).
    """
    if level not in SUITE_LEVELS:
        raise ValueError(f"level must be one of {', '.join(SUITE_LEVELS)}, got {level!r}")
    if level == "shifts":  # no attack: clean false positives and natural shifts only
        return []
    s = eps / (8 / 255)

    def linf(k: float) -> float:
        return k / 255 * s

    l2 = 0.5 * s * math.sqrt(input_dims / 3072)
    entries = [
        SuiteEntry("FGSM L∞ 8/255", "fgsm", {"eps": linf(8)}, "quick"),
        SuiteEntry("PGD-10 L∞ 2/255", "pgd", {"eps": linf(2), "alpha": linf(0.5), "steps": 10}, "quick"),
        SuiteEntry("PGD-10 L∞ 4/255", "pgd", {"eps": linf(4), "alpha": linf(1), "steps": 10}, "full"),
        SuiteEntry("PGD-10 L∞ 8/255", "pgd", {"eps": linf(8), "alpha": linf(2), "steps": 10}, "quick"),
        SuiteEntry("PGD-10 L∞ 16/255", "pgd", {"eps": linf(16), "alpha": linf(4), "steps": 10}, "full"),
        SuiteEntry("PGD-50 L∞ 8/255", "pgd", {"eps": linf(8), "alpha": linf(1), "steps": 50}, "full"),
        SuiteEntry("PGD-10 L∞ 8/255, random start", "pgd",
                   {"eps": linf(8), "alpha": linf(2), "steps": 10, "random_start": True, "seed": seed}, "full"),
        SuiteEntry("PGD-10 L2 0.5", "pgd-l2", {"eps": l2, "alpha": l2 / 4, "steps": 10}, "full"),
        SuiteEntry("APGD-CE L∞ 8/255", "apgd-ce", {"eps": linf(8), "steps": 20, "seed": seed}, "full"),
        SuiteEntry("PGD L∞ 8/255, stopped at first misclassification", "pgd-early-stop",
                   {"eps": linf(8), "alpha": linf(0.5), "steps": 40}, "quick"),
        SuiteEntry("CW-L2", "cw-l2", {"c": 1.0, "steps": 50, "lr": 0.01}, "full"),
        SuiteEntry("DeepFool", "deepfool", {"steps": 50, "overshoot": 0.02}, "full"),
        SuiteEntry("Square L∞ 8/255 (black-box)", "square", {"eps": linf(8), "n_queries": 500, "seed": seed}, "full"),
        SuiteEntry("adaptive: margin capped at the clean median, L∞ 8/255", "margin-capped",
                   {"eps": linf(8), "alpha": linf(0.5), "steps": 40}, "quick"),
        SuiteEntry("adaptive: back-off along the PGD path, L∞ 8/255", "backoff",
                   {"eps": linf(8), "alpha": linf(1), "steps": 20}, "quick"),
    ]
    entries += [SuiteEntry(f"adaptive: feature matching λ={lam:g}, L∞ 8/255", "feature-matching",
                           {"eps": linf(8), "alpha": linf(0.5), "steps": 30, "lam": lam}, "full")
                for lam in (0.1, 1.0)]
    entries.append(SuiteEntry("adaptive: descent on the detector's score, L∞ 8/255", "score-descent",
                              {"eps": linf(8), "alpha": linf(0.5), "steps": 30, "lam": 1.0}, "full"))
    return [e for e in entries if level == "full" or e.level == "quick"]


def same_attack(attack: str, params: dict[str, Any], other: str, other_params: dict[str, Any]) -> bool:
    """Whether two (registered attack, parameters) pairs run the same attack: equal names and equal
    parameters (numbers to rounding), a missing ``random_start`` read as none and seeds ignored."""
    if attack != other:
        return False
    a = {"random_start": False, **{k: v for k, v in params.items() if k != "seed"}}
    b = {"random_start": False, **{k: v for k, v in other_params.items() if k != "seed"}}
    if a.keys() != b.keys():
        return False
    return all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-12)
               if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)) else a[k] == b[k] for k in a)


# -- baselines -------------------------------------------------------------------------------------
def baseline_scores(analysis: Analysis, mahalanobis: LayerGaussians | None) -> dict[str, np.ndarray]:
    """One score per input and baseline, larger = more suspicious (one-sided, as each is used).

    ``mahalanobis``: class-conditional statistics of φ alone (no probes); the score is the distance
    to the nearest class mean under the shared covariance (Lee et al., 2018), log(1 + d²).
    """
    p = analysis.probabilities.double().cpu()
    scores = {
        "max-softmax": (1.0 - p.max(dim=1).values).numpy(),
        "entropy": (-(p * p.clamp_min(1e-300).log()).sum(dim=1)).numpy(),
        "kappa": analysis.sharpness.double().cpu().numpy(),
    }
    if mahalanobis is not None:
        scores["mahalanobis"] = mahalanobis.distances([], analysis.phi, None)[:, 0].cpu().numpy()
    return scores


# -- records ---------------------------------------------------------------------------------------
def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


@dataclass
class AttackRecord:
    """What one attack achieved against the classifier and the detector, on held-out images."""

    label: str
    attack: str
    kind: str
    norm: str
    params: dict[str, Any]
    n_attacked: int
    accuracy_under_attack: float  # over all evaluated images: correct before and after the attack
    success: Rate  # over attacked (correctly classified) images
    detection: Rate  # over the successful adversarials, at the bundle's operating point
    evasion: Rate  # over attacked images: misclassified and not flagged
    auroc: float  # clean (correct) vs successful adversarials, by the detector's score
    uncanny_valley: Rate  # over the successful adversarials
    median_margin: float | None  # landing margin (top logit minus runner-up) of the successful adversarials
    beyond_clean: Rate  # successful adversarials landing beyond the clean margins' LANDING_QUANTILE
    detection_beyond: Rate  # of those, flagged
    detection_within: Rate  # of the others, flagged
    median_linf: float | None
    median_l2: float | None
    evasion_budget_linf: float | None  # median perturbation of the successful, unflagged adversarials
    evasion_budget_l2: float | None
    baselines: dict[str, dict[str, float]]
    seconds: float
    image_ids: list[int] = field(repr=False)  # attacked images, positions in the test split
    scores: list[float] = field(repr=False)  # detector score of each successful adversarial
    margins: list[float] = field(repr=False)  # landing margin of each successful adversarial
    linf: list[float] = field(repr=False)  # per attacked image, in image_ids order
    l2: list[float] = field(repr=False)
    evaded: list[bool] = field(repr=False)  # misclassified and not flagged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShiftRecord:
    """False alarms and accuracy under one natural shift of the held-out clean images."""

    name: str
    flagged: Rate  # over all shifted images
    flagged_correct: Rate  # over shifted images still classified correctly
    accuracy: float
    scores: list[float] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    """The whole evaluation: clean false positives, one record per attack and per shift, and ids."""

    detector: dict[str, Any]
    target_fpr: float
    clean: dict[str, Any]
    attacks: list[AttackRecord]
    shifts: list[ShiftRecord]
    image_ids: dict[str, list[int]]
    seconds: float
    evasion_budget: dict[str, Any] = field(default_factory=dict)
    held_out_draw: str | None = None  # how the evaluated images were drawn, as the caller said

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector, "target_fpr": self.target_fpr, "clean": self.clean,
            "attacks": [a.to_dict() for a in self.attacks], "shifts": [s.to_dict() for s in self.shifts],
            "evasion_budget": self.evasion_budget, "image_ids": self.image_ids, "seconds": self.seconds,
            "held_out_draw": self.held_out_draw,
        }


def evasion_budgets(attacks: Sequence[AttackRecord], n_evaded_clean: int = 0) -> dict[str, Any]:
    """Per input, the smallest perturbation at which an attack got it past classifier and detector.

    Groups: every attack of the suite, then each kind present (``minimal``: attacks that stop at the
    decision boundary).  For each group, L∞ and L2 budgets over the attacked (correctly classified)
    images, their median with a 95% interval and quartiles, and the share evaded at all; ``over_all``
    adds the ``n_evaded_clean`` evaluated images the classifier already gets wrong and the detector
    does not flag, at budget 0 (an attacker needs no perturbation for them; wrong but flagged clean
    images were not attacked and are left out).  ``per_input`` holds each attacked image's budgets
    in the attacks' ``image_ids`` order (None: no attack of the group evaded on it).
    """
    if not attacks:
        return {}
    ids = attacks[0].image_ids
    if any(a.image_ids != ids for a in attacks):
        raise ValueError("every attack must run on the same images, in the same order")
    groups = {"all attacks": list(attacks)}
    for kind in dict.fromkeys(a.kind for a in attacks):
        groups[kind] = [a for a in attacks if a.kind == kind]
    out: dict[str, Any] = {"over": "attacked images: correctly classified held-out images", "groups": {}}
    for name, members in groups.items():
        evaded = np.array([m.evaded for m in members], dtype=bool).reshape(len(members), len(ids))
        entry: dict[str, Any] = {"attacks": [m.label for m in members]}
        for norm in ("linf", "l2"):
            size = np.array([getattr(m, norm) for m in members], dtype=np.float64).reshape(evaded.shape)
            budget = evasion_budget(size, evaded)
            entry[norm] = budget_summary(budget)
            entry[f"{norm}_over_all"] = budget_summary(np.r_[np.zeros(n_evaded_clean), budget])
            entry[f"per_input_{norm}"] = [float(b) if np.isfinite(b) else None for b in budget]
        out["groups"][name] = entry
    return out


def _estimator_name(estimator) -> str:
    """The classifier's name, and its steps' for a pipeline ("StandardScaler + LogisticRegression")."""
    steps = getattr(estimator, "steps", None)
    return " + ".join(type(step).__name__ for _, step in steps) if steps else type(estimator).__name__


def check_disjoint(evaluated: Sequence[int], excluded: Sequence[int]) -> None:
    """Refuse to evaluate on any image the detector was fitted or calibrated on.

    Both are positions in the split, counted from 0: a negative one would name an image from the end,
    which a comparison of the numbers as written would not see."""
    for name, ids in (("evaluated", evaluated), ("excluded", excluded)):
        ids = np.asarray(ids)
        if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0):
            raise ValueError(f"{name} images must be positions in the split (integers ≥ 0), "
                             f"got {ids[:5].tolist()}{'…' if ids.size > 5 else ''}")
    overlap = np.intersect1d(np.asarray(evaluated), np.asarray(excluded))
    if overlap.size:
        raise ValueError(f"{overlap.size} evaluated images were used to fit or calibrate the detector "
                         f"(e.g. test positions {overlap[:5].tolist()}): evaluate on held-out images only")


def held_out_images(correct: np.ndarray, excluded: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of up to ``n`` images of a split, none in ``excluded``, drawn at random so that
    the share of them the classifier gets wrong is, in expectation, the whole split's (``correct``: one
    bool per image; fewer than ``n`` when the images left over are too few).

    The detector's fit and calibration images are drawn from the ones the classifier gets right, so
    the images left over hold more of its mistakes than the split does; a plain draw from them would
    read its accuracy low and put more wrong images into every rate taken over all held-out images.
    """
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    correct = np.asarray(correct, dtype=bool)
    pool = np.setdiff1d(np.arange(len(correct)), np.asarray(excluded, dtype=np.int64))
    right, wrong = pool[correct[pool]], pool[~correct[pool]]
    n_right = int(correct.sum())
    if right.size and n_right:
        # wrong / (right + wrong) as in the split, rounded to the nearest image in integers.
        n_wrong = correct.size - n_right
        keep = min(wrong.size, (2 * n_wrong * right.size + n_right) // (2 * n_right))
        wrong = rng.permutation(wrong)[:keep]
    return np.sort(rng.permutation(np.concatenate([right, wrong]))[:n])


def logit_margin(logits: torch.Tensor) -> np.ndarray:
    """Per row, the top logit minus the runner-up (float64): how far past its decision boundary the
    classifier is, whichever class it chose."""
    top2 = logits.double().topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).cpu().numpy()


def landing(margins: np.ndarray, flagged: np.ndarray, clean_margins: np.ndarray,
            quantile: float = LANDING_QUANTILE) -> dict[str, Any]:
    """Where successful adversarials land beside clean images, and what the detector flags of each part.

    ``margins`` and ``flagged``: per successful adversarial, its landing margin and the detector's flag;
    ``clean_margins``: the held-out clean, correctly classified images' margins.  Returns the
    adversarials' median margin, the share ``beyond_clean`` above the clean margins' ``quantile`` and
    the detection rate beyond and within it.
    """
    margins = np.asarray(margins, dtype=np.float64).ravel()
    flagged = np.asarray(flagged, dtype=bool).ravel()
    if margins.shape != flagged.shape:
        raise ValueError(f"{margins.size} margins but {flagged.size} flags")
    if np.asarray(clean_margins).size == 0:
        raise ValueError("no clean margins to compare with")
    cut = float(np.quantile(np.asarray(clean_margins, dtype=np.float64), quantile))
    beyond = margins > cut
    return {"median_margin": _median(margins), "beyond_clean": rate(beyond),
            "detection_beyond": rate(flagged[beyond]), "detection_within": rate(flagged[~beyond])}


# -- the evaluation --------------------------------------------------------------------------------
def _with_logits(rows_and_analysis):
    rows, out = rows_and_analysis
    return out.logits, rows


#: Temperature of a tree detector's softened splits, per feature, in robust spreads of clean
#: calibration rows: the attacker's differentiable stand-in for the trees (:mod:`detector.smoothing`).
SPLIT_SMOOTHING = 0.3


def decision_for_attacker(bundle: Bundle, clean_rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The detector's logit as the attacker differentiates it: exact for a linear detector, trees
    softened at :data:`SPLIT_SMOOTHING` robust spreads of the clean rows' features, None when it has
    neither."""
    detector = bundle.detector
    kind = detector.gradient
    if kind == "exact":
        return detector.decision_tensor
    if kind == "smoothed":
        temperature = split_temperature(clean_rows, SPLIT_SMOOTHING)
        return lambda rows: detector.decision_tensor(rows, temperature.to(rows))
    return None


def describe_gradient(bundle: Bundle) -> str:
    """What the score-descent attack descends, in words, for the report."""
    return {"exact": "the detector's exact logit (a logistic regression)",
            "smoothed": f"the detector's tree(s) with every split softened to a sigmoid at {SPLIT_SMOOTHING:g} "
                        "robust spreads (1.4826 · MAD) of its feature over clean calibration images",
            None: "nothing of the detector's (no gradient): the margin-capped attack, keeping its least "
                  "suspicious iterate"}[bundle.detector.gradient]


def _oracles(bundle: Bundle, calibration_rows: np.ndarray, clean_margin: float) -> dict[str, Any]:
    """What an adaptive attacker who knows the detector is given."""
    rows = torch.as_tensor(calibration_rows, dtype=torch.float32)
    return {
        "layer": bundle.layer,
        "margin": clean_margin,
        "flagged": lambda x: torch.as_tensor(bundle.detect(x).adversarial),
        "score": lambda x: torch.as_tensor(bundle.detect(x).adversarial_score),
        "features": lambda x: _with_logits(bundle.features_with_grad(x)),
        "decision": decision_for_attacker(bundle, rows),
        "target": rows.mean(dim=0),
        "scale": rows.std(dim=0),
    }


def evaluate(
    bundle: Bundle,
    data: ImageDataset,
    images: np.ndarray,
    *,
    excluded: np.ndarray,
    suite: Sequence[SuiteEntry],
    calibration: np.ndarray | None = None,
    shifts: Sequence[str] = tuple(SHIFTS),
    reference: ImageDataset | None = None,
    calibration_fraction: float = 0.3,
    target_fpr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    held_out_draw: str | None = None,
) -> Evaluation:
    """Evaluate ``bundle`` on ``data[images]``, none of which may be in ``excluded``.

    Clean ``calibration`` images (the ones the detector's own threshold was set on; else a
    ``calibration_fraction`` of ``images``) set the baselines' thresholds at ``target_fpr`` and the
    adaptive attacks' knowledge of clean inputs; attacks, shifts and clean false positives are
    measured on the rest.  ``reference`` (clean training images) fits the
    Mahalanobis baseline.  ``held_out_draw`` says how ``images`` were drawn (recorded as given;
    :data:`HELD_OUT_DRAW` for :func:`held_out_images`).
    """
    started = time.perf_counter()
    check_disjoint(images, excluded)
    images = np.asarray(images, dtype=np.int64)
    if len(np.unique(images)) != len(images):
        raise ValueError("images must not repeat")
    if images.size and images.max() >= len(data):
        raise ValueError(f"images must be positions in the split of {len(data)}, got {int(images.max())}")
    device = next(bundle.model.parameters()).device
    if calibration is None:
        order = np.random.default_rng(seed).permutation(images)
        n_cal = int(round(len(order) * calibration_fraction))
        calibration, held_out = np.sort(order[:n_cal]), np.sort(order[n_cal:])
    else:
        calibration, held_out = np.sort(np.asarray(calibration, dtype=np.int64)), np.sort(images)
        check_disjoint(held_out, calibration)
    if len(calibration) < 20 or len(held_out) < 20:
        raise ValueError(f"too few images: {len(calibration)} for calibration and {len(held_out)} to evaluate, "
                         f"need at least 20 of each")

    def run_clean(index: np.ndarray):
        def clean_batch(positions: np.ndarray, _: int) -> dict[str, Any]:
            x, y = data.batch(torch.as_tensor(index[positions]))
            answer, out = bundle.detect_with_analysis(x.to(device))
            return {"labels": answer.labels == y.numpy(), "flagged": answer.adversarial,
                    "score": answer.adversarial_score, "rows": answer.features,
                    "margin": logit_margin(out.logits), "baselines": baseline_scores(out, mahalanobis)}

        return distributed.map_batches(len(index), batch_size, clean_batch)

    mahalanobis = None
    if reference is not None:  # fitted on φ of up to 2,000 clean training images it gets right
        ref_index = np.random.default_rng(seed).permutation(len(reference))[:2000]
        x_ref, y_ref = reference.batch(torch.as_tensor(ref_index))
        mahalanobis = LayerGaussians([], bundle.layer).fit(bundle.model, x_ref, y_ref, batch_size=batch_size)

    cal = run_clean(calibration)
    cal_correct = cal["labels"]
    baseline_thresholds = {b: flagging_threshold(s[cal_correct], target_fpr) for b, s in cal["baselines"].items()}
    clean = run_clean(held_out)
    correct = clean["labels"]
    clean_record = {
        "n": int(len(held_out)),
        "accuracy": float(correct.mean()),
        "false_positives_correct": rate(clean["flagged"][correct]),
        "false_positives_all": rate(clean["flagged"]),
        "baseline_false_positives_correct": {
            b: rate(s[correct] >= baseline_thresholds[b]) for b, s in clean["baselines"].items()},
        "scores_correct": clean["score"][correct].tolist(),
        "median_margin": _median(clean["margin"][correct]),
        "margin_quantile": {"quantile": LANDING_QUANTILE,
                            "value": float(np.quantile(clean["margin"][correct], LANDING_QUANTILE))
                            if correct.any() else None},
        "margins_correct": clean["margin"][correct].tolist(),
    }
    oracles = _oracles(bundle, cal["rows"][cal_correct], float(np.median(cal["margin"][cal_correct])))
    targets = held_out[correct]
    clean_scores = clean["score"][correct]
    clean_baselines = {b: s[correct] for b, s in clean["baselines"].items()}

    records = []
    for entry in tqdm(suite, desc="attack suite", unit="attack", disable=not progress):
        info = get_attack(entry.attack)
        t0 = time.perf_counter()
        params = {**entry.params, **{k: oracles[k] for k in info.needs}}
        def attack_batch(positions: np.ndarray, _: int, info=info, params=params) -> dict[str, Any]:
            x, y = data.batch(torch.as_tensor(targets[positions]))
            x, y = x.to(device), y.to(device)
            x_adv = info.fn(bundle.model, x, y, **params)
            answer, out = bundle.detect_with_analysis(x_adv)
            delta = (x_adv - x).flatten(1)
            return {"success": answer.labels != y.cpu().numpy(), "flagged": answer.adversarial,
                    "score": answer.adversarial_score, "valley": answer.uncanny_valley,
                    "margin": logit_margin(out.logits), "linf": delta.abs().amax(dim=1).cpu().numpy(),
                    "l2": torch.linalg.vector_norm(delta, dim=1).cpu().numpy(),
                    "baselines": baseline_scores(out, mahalanobis)}

        if len(targets) == 0:
            raise ValueError("the classifier gets none of the evaluated images right: there is nothing to attack")
        merged = distributed.map_batches(len(targets), batch_size, attack_batch)
        adv_baselines = merged.pop("baselines")
        success = merged["success"]
        flagged = merged["flagged"]
        unflagged = success & ~flagged
        y_true = np.r_[np.zeros(len(clean_scores)), np.ones(int(success.sum()))]
        baselines = {
            b: {"detection": float(np.mean(adv_baselines[b][success] >= baseline_thresholds[b])) if success.any()
                else float("nan"),
                "auroc": auroc(y_true, np.r_[clean_baselines[b], adv_baselines[b][success]])}
            for b in adv_baselines
        }
        record = AttackRecord(
            label=entry.label, attack=entry.attack, kind=info.kind, norm=info.norm,
            params={k: v for k, v in entry.params.items()},
            n_attacked=int(len(targets)), accuracy_under_attack=float((~success).sum() / len(held_out)),
            success=rate(success), detection=rate(flagged[success]),
            evasion=evasion_rate(success, flagged),
            auroc=auroc(y_true, np.r_[clean_scores, merged["score"][success]]),
            uncanny_valley=rate(merged["valley"][success]),
            **landing(merged["margin"][success], flagged[success], clean["margin"][correct]),
            median_linf=_median(merged["linf"][success]), median_l2=_median(merged["l2"][success]),
            evasion_budget_linf=_median(merged["linf"][unflagged]),
            evasion_budget_l2=_median(merged["l2"][unflagged]),
            baselines=baselines, seconds=round(time.perf_counter() - t0, 2),
            image_ids=targets.tolist(), scores=merged["score"][success].tolist(),
            margins=merged["margin"][success].tolist(),
            linf=merged["linf"].tolist(), l2=merged["l2"].tolist(), evaded=unflagged.tolist(),
        )
        if record.detection["n"] != int(success.sum()):
            raise AssertionError("detection counted over other rows than the successful adversarials")
        records.append(record)
        if log is not None:
            log(f"{entry.label}: success {record.success['rate']:.1%}, detected {record.detection['rate']:.1%}, "
                f"evasion {record.evasion['rate']:.1%}")

    shift_records = []
    for name in tqdm(shifts, desc="natural shifts", unit="shift", disable=not progress):
        def shift_batch(positions: np.ndarray, _: int, name=name) -> dict[str, np.ndarray]:
            x, y = data.batch(torch.as_tensor(held_out[positions]))
            answer = bundle.detect(apply_shift(name, x.to(device)))
            return {"flagged": answer.adversarial, "right": answer.labels == y.numpy(),
                    "score": answer.adversarial_score}

        shifted = distributed.map_batches(len(held_out), batch_size, shift_batch)
        flagged, right = shifted["flagged"], shifted["right"]
        shift_records.append(ShiftRecord(name, rate(flagged), rate(flagged[right]), float(right.mean()),
                                         shifted["score"].tolist()))

    detector = bundle.detector
    return Evaluation(
        detector={**detector.reads(), "estimator": _estimator_name(detector.estimator_),
                  "threshold": detector.operating_threshold, "gradient": describe_gradient(bundle),
                  "target_fpr": getattr(detector, "target_fpr", None)},
        target_fpr=target_fpr, clean=clean_record, attacks=records, shifts=shift_records,
        image_ids={"calibration": calibration.tolist(), "evaluated": held_out.tolist(),
                   "excluded": np.asarray(excluded, dtype=np.int64).tolist()},
        seconds=round(time.perf_counter() - started, 2),
        evasion_budget=evasion_budgets(records, int((~correct & ~clean["flagged"]).sum())),
        held_out_draw=held_out_draw,
    )
