"""``python -m benchmarks.scaling``: what attack generation and a scan cost for ImageNet-sized work.

Measures, on the given device, the per-image cost of a ResNet-50 (torchvision's, random weights:
the cost does not depend on them) at 224×224: one forward pass (what ``detector-scan`` and the
service spend per image) and one forward+backward pass to the input (one PGD step).  From those it
prints what ``detector-train``'s attack stage (PGD-10 with the path recorded, then the same path
again for the earlier layers' features: 20 forward+backward passes and 12 forward passes per
attacked image) and a scan of the ImageNet validation and training sets take per device, and with
``R`` ranks under torchrun (the shards are independent; the gather at the end moves rows, not
images).  Decoding JPEGs is not included.  ::

    python -m benchmarks.scaling --device cpu
    python -m benchmarks.scaling --device cuda --batch-size 128 --amp bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

IMAGENET = {"validation (50,000)": 50_000, "training (1,281,167)": 1_281_167}
ATTACKED = 10_000  # images attacked to fit a detector: five times the default --max-samples
RANKS = (1, 8, 64)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, cuDNN autotuning)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure(device: str, batch_size: int, amp: str, repeats: int) -> dict[str, float]:
    from torchvision.models import resnet50

    dev = torch.device(device)
    model = resnet50(weights=None).to(dev).eval()
    x = torch.rand(batch_size, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch_size,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)

    def forward():
        with torch.inference_mode(), autocast:
            model(x)

    def forward_backward():
        xi = x.clone().requires_grad_(True)
        with autocast:
            loss = F.cross_entropy(model(xi).float(), y)
        torch.autograd.grad(loss, xi)

    return {"forward_s_per_image": _time(forward, repeats) / batch_size,
            "forward_backward_s_per_image": _time(forward_backward, repeats) / batch_size}


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def table(cost: dict[str, float]) -> str:
    attack = 20 * cost["forward_backward_s_per_image"] + 12 * cost["forward_s_per_image"]
    lines = ["| work | per image | " + " | ".join(f"{r} rank{'s' if r > 1 else ''}" for r in RANKS) + " |",
             "|---|---:|" + "---:|" * len(RANKS)]
    rows = [(f"attack stage of detector-train, {ATTACKED:,} images", attack, ATTACKED)]
    rows += [(f"detector-scan, ImageNet {name}", cost["forward_s_per_image"], n) for name, n in IMAGENET.items()]
    for name, per_image, n in rows:
        lines.append(f"| {name} | {per_image * 1000:.1f} ms | "
                     + " | ".join(_hours(per_image * n / r) for r in RANKS) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the measurement here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cost = measure(args.device, args.batch_size, args.amp, args.repeats)
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"ResNet-50, 224×224, batch {args.batch_size}, {args.amp}, on {device}: forward "
          f"{cost['forward_s_per_image'] * 1000:.1f} ms/image, forward+backward "
          f"{cost['forward_backward_s_per_image'] * 1000:.1f} ms/image\n")
    print(table(cost))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**cost, "device": device, "batch_size": args.batch_size, "amp": args.amp}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
