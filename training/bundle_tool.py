"""``detector-bundle``: check a bundle (and print the hash to pin it with), attach an evaluation
``detector-evaluate`` wrote to the bundle it judged, or convert a bundle of the old, pickled format
once, on the user's word that it is trusted."""

from __future__ import annotations

import argparse
import sys

from detector.bundle import BundleError, convert_pickled_bundle, verify_bundle

from .options import PipelineError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detector-bundle", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = p.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every file against the manifest and print the bundle's SHA-256 "
                                           "(what detector-serve --bundle-sha256 pins)")
    verify.add_argument("bundle")
    verify.add_argument("--sha256", help="refuse unless the bundle's hash is this one")
    attach = sub.add_parser("attach-evaluation",
                            help="write an evaluation detector-evaluate wrote into the bundle it judged, so that "
                                 "/model serves it as the bundle's coverage (detector-evaluate --attach does it "
                                 "at once); prints the bundle's new SHA-256")
    attach.add_argument("bundle")
    attach.add_argument("evaluation", help="evaluation.json, or the folder detector-evaluate wrote it to")
    convert = sub.add_parser("convert", help="rewrite a format-1 bundle (detector.joblib, a pickle) as the current "
                                             "format (detector.skops) in place")
    convert.add_argument("bundle")
    convert.add_argument("--trust-pickle", action="store_true", required=True,
                         help="required: converting unpickles detector.joblib once, which runs any code it holds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":
            print(verify_bundle(args.bundle, args.sha256))
        elif args.command == "attach-evaluation":
            from .evaluate import (  # the report's plots: only when one is written
                attach_evaluation,
                read_evaluation,
            )

            evaluation = read_evaluation(args.evaluation)
            digest = attach_evaluation(args.bundle, evaluation)
            print(f"attached {args.evaluation} to {args.bundle}; new bundle SHA-256:", file=sys.stderr)
            print(digest)
        else:
            digest = convert_pickled_bundle(args.bundle)
            print(f"converted {args.bundle}: detector.joblib → detector.skops; new bundle SHA-256:", file=sys.stderr)
            print(digest)
    except (BundleError, PipelineError, OSError) as exc:  # OSError: a file it cannot read or write
        print(f"detector-bundle: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
