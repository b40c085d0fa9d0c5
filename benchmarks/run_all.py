"""Run every benchmark and write ``docs/BENCHMARKS.md``.

::

    python -m benchmarks                     # the full CPU suite (≈ 20 min on 2 cores), writes the doc
    python -m benchmarks --quick             # smoke mode (≈ 1 min); writes under $TMPDIR/detector-benchmarks-quick/
    python -m benchmarks --device cuda       # the GPU suite (batch sizes up to 1024, fp32/bf16/fp16 autocast)

Each run stores its sections in ``benchmarks/results/<device kind>.json``; the document is rendered
from every results file present, so a GPU run adds its tables next to the CPU ones (and until one
exists the GPU rows say "not yet measured").
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from detector.estimator import DEFAULT_DETECTOR, DETECTORS

from . import common
from .common import REPO, Section, Table, Target

RESULTS_DIR = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
ITEMS = ("overhead", "kappa", "pgd", "service", "decode")
COMMAND = "python -m benchmarks"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, few repeats (≈ 1 min)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--amp", type=_names, default=None,
                   help="precisions for item 1, comma-separated from none,bf16,fp16 "
                        "(default: none on cpu; none,bf16,fp16 on cuda)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="batch sizes for item 1 (default 1,32,256 on cpu; 1,32,256,1024 on cuda)")
    p.add_argument("--archs", type=_names, default=("cnn", "wrn"), help="models for item 1 (default cnn,wrn)")
    p.add_argument("--detector", choices=sorted(DETECTORS), default=None,
                   help=f"item 1: the detector kind in the `detect (default)` columns (default {DEFAULT_DETECTOR})")
    p.add_argument("--only", type=_names, default=ITEMS, help=f"items to run (default all: {','.join(ITEMS)})")
    p.add_argument("--bundle", default=None,
                   help="item 4: serve this bundle instead of building the default one with training.pipeline")
    p.add_argument("--service-seconds", type=float, default=None,
                   help="item 4: seconds of load per mode (default 20; 2 with --quick)")
    p.add_argument("--service-soak-seconds", type=float, default=None,
                   help="item 4: seconds of extra load for the memory check (default 100; 0 with --quick)")
    p.add_argument("--no-reference-detectors", dest="peers", action="store_false",
                   help="item 1: leave out the feature-squeezing- and Mahalanobis-style reference points")
    p.add_argument("--repeats", type=int, default=None,
                   help="item 1: samples per cell, each at least 0.1 s (default: set per model, batch and device)")
    p.add_argument("--service-clients", type=int, default=None,
                   help="item 4: concurrent clients (default 64; 8 with --quick)")
    p.add_argument("--out", default=None,
                   help=f"the document to write (default {DOC.relative_to(REPO)}; with --quick "
                        "$TMPDIR/detector-benchmarks-quick/BENCHMARKS.md)")
    p.add_argument("--results-dir", default=None,
                   help="where results JSON go (default benchmarks/results; with --quick the temp dir above)")
    p.add_argument("--wait-load", type=float, default=None,
                   help="before starting, wait until the 1-minute load average is below this "
                        "(default 1.0 for a full run, off with --quick; 0 = do not wait)")
    p.add_argument("--max-wait-min", type=float, default=20.0, help="longest wait for a low load (default 20)")
    p.add_argument("--quiet-cores", type=float, default=None,
                   help="before each item, wait (up to a quarter of --max-wait-min) until other processes use fewer "
                        "cores than this (default 0.3 for a full run, off with --quick; 0 = do not wait)")
    return p


def run_sections(args: argparse.Namespace, device: torch.device, log=print,
                 done: Callable[[list[Section]], None] | None = None) -> list[Section]:
    """Run the items of ``args.only`` in order; ``done(sections so far)`` after each one, so that what was
    measured is kept when a later item is stopped."""
    sections: list[Section] = []
    cuda = device.type == "cuda"
    amps = args.amp or (("none", "bf16", "fp16") if cuda else ("none",))
    batch_sizes = args.batch_sizes or ((1, 32, 256, 1024) if cuda else (1, 32, 256))
    if args.quick and args.batch_sizes is None:
        batch_sizes = (1, 32)
    archs = args.archs if not args.quick else tuple(a for a in args.archs if a == "cnn") or args.archs[:1]
    for item in args.only:
        if getattr(args, "quiet_cores", 0) > 0:
            common.wait_for_quiet_machine(args.quiet_cores, args.max_wait_min * 60 / 4, log=log)
        log(f"[{time.strftime('%H:%M:%S')}] item {item} (load {common.load_average()}) …")
        snapshot = common.CpuSnapshot.take()
        if item == "overhead":
            from . import overhead

            repeats = getattr(args, "repeats", None)
            plan = (lambda arch, batch, quick, dev: (repeats, 0.1, 1)) if repeats else None
            sections.append(overhead.run(device, archs=archs, batch_sizes=batch_sizes, amps=amps,
                                         quick=args.quick, detector=getattr(args, "detector", None), plan=plan,
                                         peers=getattr(args, "peers", True), log=log))
        elif item == "kappa":
            from . import kappa

            sections.append(kappa.run(device, quick=args.quick, log=log))
        elif item == "pgd":
            from . import pgd_throughput

            sections.append(pgd_throughput.run(device, quick=args.quick, log=log))
        elif item == "service":
            from . import service_load

            sections.append(service_load.run(device, quick=args.quick, bundle=args.bundle,
                                             threads=torch.get_num_threads(), log=log,
                                             duration_s=getattr(args, "service_seconds", None),
                                             soak_s=getattr(args, "service_soak_seconds", None),
                                             concurrency=getattr(args, "service_clients", None)))
        elif item == "decode":
            from . import decode_cost

            sections.append(decode_cost.run(quick=args.quick, log=log))
        else:
            raise SystemExit(f"unknown item {item!r}; choose from {', '.join(ITEMS)}")
        s = sections[-1]
        s.raw["foreign_cores"] = common.foreign_cores(snapshot, common.CpuSnapshot.take())
        log(f"    done in {s.seconds:.0f} s (other processes used {s.raw['foreign_cores']:.2f} cores); targets: "
            + "; ".join(f"{t.name}: {'met' if t.met else 'MISSED' if t.met is False else 'n/a'}" for t in s.targets))
        if done is not None:
            done(sections)
    return sections


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _section_from_dict(d: dict[str, Any]) -> Section:
    d = dict(d)
    d["tables"] = [Table(**t) for t in d.get("tables", [])]
    d["targets"] = [Target(**t) for t in d.get("targets", [])]
    return Section(**d)


def _verdict(met: bool | None) -> str:
    return "met" if met else ("**missed**" if met is False else "not measured")


def render(runs: dict[str, dict[str, Any]]) -> str:
    """The whole document from the stored runs (``{"cpu": {...}, "cuda": {...}}``)."""
    out: list[str] = []
    out.append("# Benchmarks\n")
    out.append(
        "The product's claim is that detection costs almost nothing on top of classification. "
        "This document is **generated** by the benchmark suite; do not edit it by hand, re-run it:\n\n"
        "```bash\n"
        "pip install -e '.[test]'          # ART and httpx are test extras\n"
        f"{COMMAND}                 # full CPU suite, ≈ 20 min on 2 cores; writes this file\n"
        f"{COMMAND} --quick         # smoke mode, ≈ 1 min (writes to $TMPDIR/detector-benchmarks-quick/)\n"
        f"{COMMAND} --device cuda   # GPU suite: batch sizes up to 1024, fp32 + bf16/fp16 autocast\n"
        "```\n\n"
        "Scripts: `benchmarks/overhead.py` (1), `benchmarks/kappa.py` (2), `benchmarks/pgd_throughput.py` (3), "
        "`benchmarks/service_load.py` (4), `benchmarks/decode_cost.py` (5), `benchmarks/run_all.py` (this document). Raw numbers: "
        "`benchmarks/results/<device>.json`. ψ, κ, PGD and the detector are imported from `detector`; "
        "only the baselines being compared against (per-sample loop, autograd Hessian, peer detectors) are "
        "written in the benchmarks, and labelled as such.\n\n"
        "**Method.** Methods compared in one table run in one process on the same model, inputs and device, "
        "interleaved (A B C, C B A, …) so that drift on a shared machine cancels; each sample is a number of "
        "consecutive calls (the same number for every method of a table unless stated), ratios are taken per "
        "round and reported as median (interquartile range); times as median (IQR) unless stated. "
        "`torch.inference_mode` for inference, `torch.set_num_threads` = all cores unless `--threads` says "
        "otherwise. Big models are randomly initialised (their cost does not depend on the weights); the detector "
        "tree is always fitted on real ψ. No timed assertions are in the unit tests "
        "(`tests/test_benchmarks.py` only checks that the scripts run and their rows are well formed).\n")
    # Targets summary across runs.
    out.append("## Targets\n")
    rows = []
    for kind, run in runs.items():
        for sd in run["sections"]:
            s = _section_from_dict(sd)
            for t in s.targets:
                rows.append([kind, t.name, t.target, t.measured, _verdict(t.met)])
    if "cuda" not in runs:
        rows.append(["cuda", "6. the suite on a GPU (batch ≤ 1024, bf16/fp16 autocast, ψ in float32)",
                     "tables below", "not yet measured (no GPU lent in this task)", "not measured"])
    out.append(_md_table(["device", "what", "target", "measured", "verdict"], rows) + "\n")
    for kind, run in runs.items():
        out.append(f"## Run on {kind}\n")
        info = dict(run["machine"])
        info["command"] = f"`{run['command']}`"
        info["load average (1, 5, 15 min) at start"] = ", ".join(str(v) for v in run["load_start"])
        info["load average at end"] = ", ".join(str(v) for v in run["load_end"])
        info["wall time of the suite"] = f"{run['seconds'] / 60:.1f} min"
        out.append(_md_table(["", ""], [[k, v] for k, v in info.items()]) + "\n")
        for sd in run["sections"]:
            s = _section_from_dict(sd)
            out.append(f"### {s.title} ({kind})\n")
            out.append(s.description + "\n")
            if s.command and s.command != run["command"]:
                when = s.raw.get("measured") or {}
                at = f" at {when['commit']} on {when['date']}" if when.get("commit") and when.get("date") else ""
                out.append(f"Measured by an earlier run{at}: `{s.command}`.\n")
            foreign = s.raw.get("foreign_cores")
            out.append(f"Load average before / after: {', '.join(map(str, s.load_before or ()))} / "
                       f"{', '.join(map(str, s.load_after or ()))}"
                       + (f"; other processes kept {foreign:.2f} cores busy on average during the section"
                          if foreign is not None else "")
                       + f"; section wall time {s.seconds:.0f} s.\n")
            for t in s.tables:
                out.append(f"**{t.title}**\n")
                out.append(_md_table(t.columns, t.rows) + "\n")
                for note in t.notes:
                    out.append(f"- {note}")
                if t.notes:
                    out.append("")
            if s.targets:
                out.append("Targets: " + "; ".join(f"{t.name}: {t.target}: {t.measured}: {_verdict(t.met)}"
                                                    + (f" ({t.note})" if t.note else "") for t in s.targets) + ".\n")
            for note in s.notes:
                out.append(f"- {note}")
            if s.notes:
                out.append("")
    if "cuda" not in runs:
        out.append("## 6. On a GPU\n")
        out.append("**Not yet measured: no GPU was lent in this task.** The scripts support it as they are: "
                   f"`{COMMAND} --device cuda` runs items 1–4 on the GPU with batch sizes 1, 32, 256, 1024 and, "
                   "for item 1, the model under fp32 and bf16/fp16 autocast (ψ and κ are lifted to float32 by "
                   "`detector.features`), synchronising the device around every timed sample. Its tables will appear "
                   "here as \"Run on cuda\" next to the CPU ones. For a short GPU lease, `bash benchmarks/gpu_run.sh` "
                   "runs them in a budgeted mode after the WRN-28-4 reproduction (`benchmarks/gpu_run.py`).\n")
        out.append(_md_table(
            ["item", "model", "precision", "batch", "result"],
            [["1. overhead", m, p, "1, 32, 256, 1024", "not yet measured (no GPU lent in this task)"]
             for m in ("cnn", "wrn") for p in ("fp32", "bf16 autocast", "fp16 autocast")]
            + [["2. κ along a path", "cnn digits, cnn, wrn", "fp32", "path", "not yet measured (no GPU lent in this task)"],
               ["3. PGD-10 vs ART", "cnn digits, cnn, wrn", "fp32", "360–1024", "not yet measured (no GPU lent in this task)"],
               ["4. service under load", "default bundle", "fp32", "max batch", "not yet measured (no GPU lent in this task)"]]) + "\n")
    return "\n".join(out).rstrip() + "\n"


def compare_service(before: dict[str, Any], now: dict[str, Any], before_command: str) -> Table | None:
    """Requests/s and median latency of each (bundle, mode) row of the service section, previous run → this run."""
    def rows(section: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
        table = next((t for t in section["tables"] if t["title"].startswith("Saturation")), None)
        if table is None:
            return {}
        return {(r[0], r[1]): dict(zip(table["columns"], r)) for r in table["rows"] if "→" not in str(r[1])}

    def number(text: str) -> float:
        return float(str(text).replace(",", ""))

    old, new = rows(before), rows(now)
    shared = [k for k in new if k in old]
    if not shared:
        return None
    table = Table("Compared with the previous run of this item (same machine, same script)",
                  ["bundle", "batching", "req/s before", "req/s now", "change", "p50 before", "p50 now"],
                  notes=[f"Previous run: `{before_command}`."])
    for key in shared:
        a, b = old[key], new[key]
        change = number(b["req/s"]) / number(a["req/s"]) - 1
        table.add(key[0], key[1], a["req/s"], b["req/s"], f"{change:+.0%}", a["p50"], b["p50"])
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    threads = common.set_threads(args.threads)
    kind = "cuda" if device.type == "cuda" else "cpu"
    quick_dir = Path(tempfile.gettempdir()) / "detector-benchmarks-quick"  # smoke runs stay out of the repo
    results_dir = Path(args.results_dir) if args.results_dir else (quick_dir if args.quick else RESULTS_DIR)
    out = Path(args.out) if args.out else (results_dir / "BENCHMARKS.md" if args.quick else DOC)
    wait = args.wait_load if args.wait_load is not None else (0.0 if args.quick else 1.0)
    if args.quiet_cores is None:
        args.quiet_cores = 0.0 if args.quick else 0.3
    command = " ".join([COMMAND] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    print(f"benchmarks on {device} with {threads} torch threads; results → {results_dir}, document → {out}")
    if wait > 0:
        common.wait_for_low_load(wait, args.max_wait_min * 60)
    started = time.perf_counter()
    load_start = common.load_average()
    machine = common.machine_info(device)
    path = results_dir / f"{kind}.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    measured = {"commit": machine.get("git commit"), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    run: dict[str, Any] = {}

    def write(sections: list[Section]) -> None:
        """The results file and the document, as they stand: rewritten after every item."""
        for s in sections:
            s.command = command
            s.raw.setdefault("measured", measured)
        run.update({"command": command, "machine": machine, "load_start": load_start,
                    "load_end": common.load_average(), "seconds": time.perf_counter() - started,
                    "quick": args.quick, "sections": [asdict(s) for s in sections]})
        if previous is not None:
            for s in sections:  # the service's throughput beside the previous run's: a change must not cost it
                before = next((p for p in previous.get("sections", []) if p["key"] == s.key == "service"), None)
                if before is not None and not any(t.title.startswith("Compared with") for t in s.tables):
                    table = compare_service(before, asdict(s), before.get("command") or previous.get("command", "?"))
                    if table is not None:
                        s.tables.append(table)
            run["sections"] = [asdict(s) for s in sections]
            # Keep the sections of items not run (yet) this time from the previous run, each naming the
            # command that measured it.
            kept = [dict(p) for p in previous.get("sections", []) if p["key"] not in {s.key for s in sections}]
            for kept_section in kept:
                kept_section["command"] = kept_section.get("command") or previous.get("command", "?")
            run["sections"] = sorted(kept + run["sections"],
                                     key=lambda s: ITEMS.index(s["key"]) if s["key"] in ITEMS else 99)
        results_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=1, default=str) + "\n")
        runs = {}
        for k in ("cpu", "cuda"):
            p = results_dir / f"{k}.json"
            if p.is_file():
                runs[k] = json.loads(p.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(runs))

    sections = run_sections(args, device, done=write)
    if not sections:
        write(sections)
    print(f"wrote {out} and {path} in {run['seconds'] / 60:.1f} min")
    missed = [t for s in sections for t in s.targets if t.met is False]
    if missed:
        print("targets missed: " + "; ".join(f"{t.name} ({t.measured})" for t in missed))
    return 0
