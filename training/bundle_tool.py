"""``detector-bundle``: check a bundle (and print the hash to pin it with), or convert a bundle of the
old, pickled format once, on the user's word that it is trusted."""

from __future__ import annotations

import argparse
import sys

from detector.bundle import BundleError, convert_pickled_bundle, verify_bundle

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detector-bundle", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = p.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every file against the manifest and print the bundle's SHA-256 "
                                           "(what detector-serve --bundle-sha256 pins)")
    verify.add_argument("bundle")
    verify.add_argument("--sha256", help="refuse unless the bundle's hash is this one")
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
        else:
            digest = convert_pickled_bundle(args.bundle)
            print(f"converted {args.bundle}: detector.joblib → detector.skops; new bundle SHA-256:", file=sys.stderr)
            print(digest)
    except BundleError as exc:
        print(f"detector-bundle: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
