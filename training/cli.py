"""Command lines: ``detector-train`` (the whole pipeline) and ``detector-trajectory`` (path only).

With no arguments ``detector-train`` runs the embedded default: a small CNN on scikit-learn's
digits, PGD-10 at ε = 0.2, the default detector (:data:`detector.estimator.DEFAULT_DETECTOR`),
written to ``artifacts/default``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from fractions import Fraction

from detector import distributed
from detector.datasets import DATASET_KINDS
from detector.estimator import DETECTORS, ESTIMATORS
from detector.layers import GRAM_LAYERS_IN_WORDS
from detector.models import MODELS
from detector.shifts import shift_name

from .classifier import ADVERSARIAL_TRAINING
from .fitting import CLEAN_VARIANTS, fit_sources
from .options import DEFAULT_EPOCHS_OTHER, PipelineError, TrainOptions
from .pipeline import run

__all__ = ["add_trust_flag", "build_parser", "count", "main", "options_from_args", "positive_int", "seed_int",
           "trajectory_main", "trusted_names"]


def _number(text: str) -> float:
    """A finite float, also written as a fraction: ``8/255``."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if high is None and value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {text!r}")
    if high is not None and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must lie in {low}…{high}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (batch sizes, steps, image counts)."""
    return _integer(text, 1)


def count(text: str) -> int:
    """A whole number of at least 0 (epochs, images where 0 means none)."""
    return _integer(text, 0)


def seed_int(text: str) -> int:
    """A seed NumPy and PyTorch both take: 0 … 2³² − 1."""
    return _integer(text, 0, 2**32 - 1)


def _fit_sources(text: str) -> tuple[str, ...]:
    """``--fit-attacks``: comma-separated names of :data:`training.fitting.FIT_SOURCES`."""
    try:
        return fit_sources([part.strip().lower() for part in text.split(",") if part.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def shift_names(text: str, default: Sequence[str] = CLEAN_VARIANTS) -> tuple[str, ...]:
    """Comma-separated names of :mod:`detector.shifts` (``default`` for the ``default`` list), or ``none``
    (``--clean-variants``; ``detector-evaluate --shifts``)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if [p.lower() for p in parts] == ["none"]:
        return ()
    if not parts:
        raise argparse.ArgumentTypeError("no names given: list changes, or 'none' for none")
    if "none" in (p.lower() for p in parts):
        raise argparse.ArgumentTypeError("'none' stands alone: it cannot be listed with other names")
    try:
        names = [n for part in parts for n in (default if part.lower() == "default" else (shift_name(part),))]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return tuple(dict.fromkeys(names))


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _floats(values: list[str] | None) -> list[float] | None:
    """``--mean 0.49 0.48 0.45`` or ``--mean 0.49,0.48,0.45``."""
    if values is None:
        return None
    return [_number(v) for item in values for v in item.split(",") if v.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show and the help does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, {}) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(trajectory: bool = False) -> argparse.ArgumentParser:
    defaults = TrainOptions()
    if trajectory:
        prog, description = "detector-trajectory", (
            "Follow PGD step by step and measure the relative sharpness κ and the loss at every "
            "step (the paper's Figure 1), for a built-in or your own model. Writes "
            "figure1_trajectory.png, trajectory.csv, trajectory_per_example.csv, trajectory.json.")
    else:
        prog, description = "detector-train", (
            "Train (or load) a classifier, attack it with PGD recording the path, fit the "
            "uncanny-valley detector and write the artifact bundle with report.json, "
            "report.md and plots. With no arguments: small CNN on digits, about 20 s on a CPU.")
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("classifier")
    g.add_argument("--model", choices=sorted(MODELS), default=None,
                   help=f"built-in architecture (default {defaults.model})")
    g.add_argument("--depth", type=positive_int, help="WideResNet depth, 6n+4 (default 28)")
    g.add_argument("--width", type=positive_int, help="WideResNet widen factor (default 4) or cnn width (default 32)")
    g.add_argument("--arch", metavar="PACKAGE.MODULE:CALLABLE",
                   help="bring your own classifier: a factory returning an nn.Module (importable "
                        "from the current directory or the Python path)")
    g.add_argument("--arch-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments for the --arch factory, e.g. '{\"num_classes\": 10}'")
    g.add_argument("--weights", metavar="FILE",
                   help="state_dict or checkpoint dict holding one (weights_only=True; 'module.' "
                        "prefixes stripped)")
    g.add_argument("--mean", nargs="+", metavar="M",
                   help="per-channel mean the model expects its input normalised with")
    g.add_argument("--std", nargs="+", metavar="S", help="per-channel std, with --mean")
    g.add_argument("--layer", metavar="NAME",
                   help="the output nn.Linear when it is not the model's last nn.Linear")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=defaults.data, metavar="SPEC",
                   help=f"one of {', '.join(DATASET_KINDS)}")
    g.add_argument("--data-dir", default=defaults.data_dir,
                   help="where cifar10/cifar100 live (torchvision format, or <kind>_train.npz and "
                        "<kind>_test.npz)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument("--image-size", type=int, nargs="+", metavar="PIXELS",
                   help="folder: data only: resize every image to H W (or one size for both); default "
                        "the first training image's size")
    g.add_argument("--train-samples", type=positive_int, metavar="N",
                   help="train on a random subset of N training images")
    g.add_argument("--test-samples", type=positive_int, metavar="N",
                   help="use a random subset of N test images (clean accuracy and the detector set)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=count,
                   help=f"epochs to train the classifier (default: 0 with --weights, 10 on digits, "
                        f"else {DEFAULT_EPOCHS_OTHER}); 0 uses --weights as they are")
    g.add_argument("--lr", type=_positive_number, default=defaults.lr, help="peak learning rate (one-cycle)")
    g.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help="batch size for training and for the attack")
    g.add_argument("--adversarial-training", choices=ADVERSARIAL_TRAINING, default=None,
                   help="train (or fine-tune --weights) on adversarial inputs: pgd, PGD-k from a random start "
                        "(Madry et al.); fast, one FGSM step from a random start (Wong et al.), about twice "
                        "the cost of standard training")
    g.add_argument("--train-eps", type=_positive_number,
                   help="adversarial-training radius, in the --norm of the attack (default: the attack's --eps)")
    g.add_argument("--train-steps", type=positive_int, default=None,
                   help="PGD steps per batch of --adversarial-training pgd (default 7)")
    g = p.add_argument_group("attack (PGD)")
    g.add_argument("--eps", type=_positive_number, help="radius (default 8/255 L∞; 0.2 on digits); '8/255' works")
    g.add_argument("--alpha", type=_positive_number,
                   help="step size (default 2/255; 0.05 on digits; eps/4 when --eps is given)")
    g.add_argument("--steps", type=positive_int, help="PGD steps (default 10)")
    g.add_argument("--norm", choices=("linf", "l2"), default=defaults.norm, help="the ball: L∞ or L2")
    g.add_argument("--random-start", action="store_true", help="start from a random point in the ball")
    g = p.add_argument_group("detector" if not trajectory else "inputs")
    g.add_argument("--max-samples", type=positive_int, default=500 if trajectory else defaults.max_samples,
                   help="correctly classified clean test images to attack")
    if not trajectory:
        g.add_argument("--detector", choices=sorted(DETECTORS), default=defaults.detector,
                       help="layers: boosted trees on both phases of the attack path (output-layer curvature "
                            "and class-conditional distances of earlier layers), flagged at --target-fpr; "
                            "activations: the same rows plus those layers' channel means, "
                            "logistic regression; agreement: activations plus how much nearer another class "
                            "is than the predicted one in each earlier layer; gram: activations plus "
                            f"{GRAM_LAYERS_IN_WORDS} (channel co-activations); every-layer: activations over "
                            "every convolution, each read as the channel means of its output clipped at zero; "
                            "curvature: layers without earlier layers; paper: the paper's "
                            "decision tree on ψ, "
                            "flagged at P >= 0.5")
        g.add_argument("--estimator", choices=sorted(ESTIMATORS), default=None,
                       help="the detector's classifier instead of its own (layers and curvature: boosting; "
                            "activations: logistic; paper: tree), to compare them")
        g.add_argument("--target-fpr", type=_number, default=defaults.target_fpr,
                       help="share of clean calibration images the detector may flag, as they came and "
                            "together with their --clean-variants")
        g.add_argument("--clean-variants", type=shift_names, default=None, metavar="NAME,NAME,…|none",
                       help="what the clean fitting and calibration images also go through, so that inputs "
                            "changed that way do not fire; replaces the default list (" + ", ".join(CLEAN_VARIANTS)
                            + "): 'default,JPEG q30' keeps it and adds one; 'x' and 'sigma' stand for × and σ; "
                            "the paper's detector takes none")
        g.add_argument("--fit-attacks", type=_fit_sources, default=None, metavar="NAME,NAME,…",
                       help="the adversarials the detector is fitted on (not the paper's): 'path', every "
                            "misclassified step of the recorded PGD; 'one-step', one step of the full radius "
                            "(FGSM for L∞); 'small', PGD-10 at a quarter of the radius (default: all three)")
        g.add_argument("--test-fraction", type=_number, default=defaults.test_fraction,
                       help="share of the attacked images held out for evaluation")
        g.add_argument("--calibration-fraction", type=_number, default=defaults.calibration_fraction,
                       help="share of the remaining images kept apart (clean only) for the operating point")
        g.add_argument("--calibration-images", type=count, default=defaults.calibration_images,
                       help="clean calibration images in all: the --calibration-fraction of the attacked images, "
                            "topped up to this many (as far as the split has them) with correctly classified test "
                            "images that are neither attacked nor evaluated (no attack: one forward pass each per "
                            "variant), so that the operating point lands near --target-fpr; 0: the fraction alone. "
                            "The --evaluate-images are set apart first, with --evaluate none too, so that the "
                            "operating point does not depend on --evaluate; none for --detector paper")
        g.add_argument("--evaluate", choices=("none", "quick", "full"), default=defaults.evaluate,
                       help="the attack suite run on held-out images after fitting (full: every attack, "
                            "as detector-evaluate runs it)")
        g.add_argument("--evaluate-images", type=count, default=defaults.evaluate_images,
                       help="held-out test images the attack suite runs on, at most")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=defaults.seed,
                   help="seeds the model's initialisation, training order, sampling and split")
    g.add_argument("--device", default=defaults.device, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="auto: CUDA when torch sees a GPU")
    g.add_argument("--out", default="artifacts/trajectory" if trajectory else defaults.out,
                   help="output directory" + ("" if trajectory else " (the bundle)"))
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from_args(args: argparse.Namespace, command: str) -> TrainOptions:
    if args.arch is not None and args.model is not None:
        raise PipelineError("give either --model (built in) or --arch (your own), not both")
    return TrainOptions(
        model=args.model or TrainOptions.model,
        arch=args.arch,
        arch_kwargs=args.arch_kwargs,
        weights=args.weights,
        depth=args.depth,
        width=args.width,
        mean=_floats(args.mean),
        std=_floats(args.std),
        layer=args.layer,
        data=args.data,
        data_dir=args.data_dir,
        download=args.download,
        image_size=args.image_size,
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        adversarial_training=args.adversarial_training,
        train_eps=args.train_eps,
        train_steps=args.train_steps,
        eps=args.eps,
        alpha=args.alpha,
        steps=args.steps,
        norm=args.norm,
        random_start=args.random_start,
        max_samples=args.max_samples,
        test_fraction=getattr(args, "test_fraction", TrainOptions.test_fraction),
        detector=getattr(args, "detector", TrainOptions.detector),
        estimator=getattr(args, "estimator", None),
        target_fpr=getattr(args, "target_fpr", TrainOptions.target_fpr),
        clean_variants=getattr(args, "clean_variants", None),
        fit_attacks=getattr(args, "fit_attacks", None),
        calibration_fraction=getattr(args, "calibration_fraction", TrainOptions.calibration_fraction),
        calibration_images=getattr(args, "calibration_images", TrainOptions.calibration_images),
        evaluate=getattr(args, "evaluate", TrainOptions.evaluate),
        evaluate_images=getattr(args, "evaluate_images", TrainOptions.evaluate_images),
        seed=args.seed,
        device=args.device,
        out=args.out,
        progress=not args.no_progress,
        command=command,
    )


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """``--trust-architecture`` (also spelled ``--trusted-architectures``, as detector-serve's flag)."""
    parser.add_argument("--trust-architecture", "--trusted-architectures", dest="trust_architecture",
                        action="append", default=[], metavar="MODULE:CALLABLE[,…]",
                        help="a bring-your-own architecture the bundle may name (loading imports and calls it); "
                             "repeat it or separate names by commas")


def trusted_names(values: list[str]) -> list[str]:
    """The architecture names ``--trust-architecture`` gave, repeated or comma-separated."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _command(prog: str, argv: list[str]) -> str:
    return " ".join([prog, *map(shlex.quote, argv)])


def _entry(argv: list[str] | None, trajectory: bool) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(trajectory)
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args, _command(parser.prog, argv))
        options.progress = options.progress and distributed.is_main()  # under torchrun: rank 0's bars only
        if trajectory:
            from .trajectory import run_trajectory

            result = run_trajectory(options)
        else:
            result = run(options)
    except (PipelineError, ValueError, OSError) as exc:  # OSError: DatasetNotFoundError, a file it cannot write
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    finally:
        distributed.shutdown()
    if not distributed.is_main():
        return 0
    if trajectory:
        tr, a = result["trajectory"], result["attack"]
        print(f"clean accuracy {result['classifier']['clean_accuracy']:.1%}; PGD-{a['steps']} success "
              f"{a['success_rate']:.1%} of {a['n_attacked']}")
        print("step  mean kappa  median kappa  mean loss  misclassified")
        for t in tr["step"]:
            print(f"{t:4d}  {tr['mean_sharpness'][t]:10.4g}  {tr['median_sharpness'][t]:12.4g}  "
                  f"{tr['mean_loss'][t]:9.4g}  {tr['misclassified_fraction'][t]:13.1%}")
        print(f"peak at step {tr['peak_step']} ({tr['rise']:.2f}x clean), final {tr['fall']:.2f}x peak")
        print(f"written to {options.out}/")
    else:
        from .report import summary_text

        print(summary_text(result, options.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``detector-train``."""
    return _entry(argv, trajectory=False)


def trajectory_main(argv: list[str] | None = None) -> int:
    """``detector-trajectory``."""
    return _entry(argv, trajectory=True)


if __name__ == "__main__":
    sys.exit(main())
