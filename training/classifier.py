"""Training a classifier with the standard recipe, optionally on adversarial inputs, and measuring
its accuracy."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from detector import distributed
from detector.attacks import pgd
from detector.datasets import ImageDataset

__all__ = ["ADVERSARIAL_TRAINING", "AdversarialTraining", "accuracy", "predict", "robust_accuracy",
           "train_classifier"]

#: The adversarial-training recipes ``--adversarial-training`` offers.
ADVERSARIAL_TRAINING = ("pgd", "fast")


@dataclass(frozen=True)
class AdversarialTraining:
    """The attack a classifier is trained on, in place of its clean inputs.

    ``pgd``: PGD-k from a random start, α = 2.5·ε/k (Madry et al., 2018). ``fast``: one FGSM step of
    α = 1.25·ε from a uniform random start in the ball (Wong et al., 2020, "Fast is better than
    free"), about twice the cost of standard training.  Both come from :func:`detector.attacks.pgd`,
    which runs the model in eval mode: the attack sees batch norm's running statistics and leaves
    them alone; the weight update that follows runs in train mode on the adversarial batch.
    """

    kind: str
    eps: float
    steps: int = 7
    norm: str = "linf"

    def __post_init__(self) -> None:
        if self.kind not in ADVERSARIAL_TRAINING:
            raise ValueError(f"adversarial training must be one of {ADVERSARIAL_TRAINING}, got {self.kind!r}")
        if not self.eps > 0 or self.steps < 1:
            raise ValueError(f"adversarial training needs eps > 0 and steps >= 1 (got {self.eps}, {self.steps})")

    @property
    def alpha(self) -> float:
        return 1.25 * self.eps if self.kind == "fast" else 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        steps = 1 if self.kind == "fast" else self.steps
        return pgd(model, x, y, eps=self.eps, alpha=self.alpha, steps=steps, norm=self.norm, random_start=True)

    def describe(self) -> str:
        if self.kind == "fast":
            return f"FGSM with random start (Wong et al.), ε = {self.eps:.4g}, α = {self.alpha:.4g}"
        return f"PGD-{self.steps} with random start (Madry et al.), ε = {self.eps:.4g}, α = {self.alpha:.4g}"


#: Catastrophic overfitting (single-step training suddenly losing all robustness to PGD, Wong et al.)
#: is caught by PGD-10 accuracy on a fixed batch of training images after every epoch; a fall to less
#: than this share of the best epoch's accuracy restores that epoch's weights and stops training.
OVERFITTING_FALL = 0.5
PROBE_IMAGES = 512


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel reflect padding and horizontal flip, batched on x's device."""
    n, _, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)


def train_classifier(
    model: nn.Module,
    data: ImageDataset,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    augment: bool | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    adversary: AdversarialTraining | None = None,
    history: list[dict] | None = None,
) -> nn.Module:
    """SGD (momentum 0.9, Nesterov), one-cycle schedule, crop+flip for images ≥ 32 px; on CUDA bf16
    autocast and channels-last memory (the layout tensor cores read), the data on the GPU, and no
    host synchronisation inside an epoch.

    With an ``adversary`` every batch is replaced by its adversarial version before the update, and
    after each epoch PGD-10 accuracy on a fixed batch of training images guards against catastrophic
    overfitting (see :data:`OVERFITTING_FALL`).  ``history`` gets one dict per epoch.

    Under torchrun (after :func:`detector.distributed.init`) the model trains with
    DistributedDataParallel, each rank on its share of every epoch; ``batch_size`` is per rank.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    # Under torchrun every rank draws the same epoch order (one generator, one seed) and takes its
    # share of it, as DistributedSampler does; the augmentation is drawn per rank.
    world, me = distributed.world_size(), distributed.rank()
    generator = torch.Generator().manual_seed(seed)
    augment_generator = generator if world == 1 else torch.Generator().manual_seed(seed + 1 + me)
    if augment is None:
        augment = min(data.input_shape[1:]) >= 32
    per_rank = math.ceil(len(data) / world)
    steps_per_epoch = math.ceil(per_rank / batch_size)
    trained = model if world == 1 else DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if max(epochs, 1) * steps_per_epoch >= 8:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=max(epochs, 1),
                                                       steps_per_epoch=steps_per_epoch, pct_start=0.25)
    else:  # too few steps for a warm-up and a decay (OneCycleLR divides by zero at 4 steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    images = data.images.to(device)
    labels = data.labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    probe = torch.randperm(len(data), generator=generator)[:PROBE_IMAGES].to(device) if adversary else None
    best: tuple[float, dict] | None = None
    bar = tqdm(range(epochs), desc="train classifier" + (f" ({adversary.kind} adversarial)" if adversary else ""),
               unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(data), generator=generator)
        if world > 1:  # padded to a multiple of the world size, so that every rank takes as many steps
            order = torch.cat([order, order[: per_rank * world - len(order)]])[me::world]
        order = order.to(device)
        total = 0
        correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        batches = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       leave=False, disable=not progress)
        for start in batches:
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch norm cannot train on a lone example (a last batch of one)
                continue
            x = images[idx].float().div_(255)
            y = labels[idx]
            if augment:
                x = _augment(x, augment_generator)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                if adversary is not None:
                    x = adversary(model, x, y)  # the bare model: DDP synchronises the weights' gradients only
                logits = trained(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
        if not total:
            continue
        record = {"epoch": epoch + 1, "loss": float(loss_sum) / total, "accuracy": int(correct) / total}
        if adversary is not None:
            x_probe = images[probe].float().div_(255)
            record["probe_pgd10_accuracy"] = distributed.broadcast(  # every rank decides as rank 0 does
                robust_accuracy(model, x_probe, labels[probe], adversary.eps, norm=adversary.norm))
            model.train()
            if best is None or record["probe_pgd10_accuracy"] > best[0]:
                best = (record["probe_pgd10_accuracy"], copy.deepcopy(model.state_dict()))
            elif record["probe_pgd10_accuracy"] < OVERFITTING_FALL * best[0]:
                model.load_state_dict(best[1])
                record["stopped"] = (f"PGD-10 accuracy on {len(probe)} training images fell from {best[0]:.1%} "
                                     f"to {record['probe_pgd10_accuracy']:.1%} (catastrophic overfitting): "
                                     f"the best epoch's weights were restored and training stopped")
                tqdm.write(f"warning: {record['stopped']}")
        if history is not None:
            history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k not in ("epoch", "stopped")})
        if "stopped" in record:
            break
    if cuda:
        model.to(memory_format=torch.contiguous_format)  # the bundle's weights are saved in the usual layout
    # DDP aligns batch-norm statistics only before each forward: every rank now takes rank 0's model,
    # the one that is saved, so that all ranks measure and attack the same classifier.
    distributed.broadcast_module(model)
    model.eval()
    return model


@torch.inference_mode()
def predict(model: nn.Module, data: ImageDataset, batch_size: int = 512,
            device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Predicted labels for every image of ``data`` (on the CPU)."""
    model.to(device).eval()
    out = []
    for start in tqdm(range(0, len(data), batch_size), desc="score test split", unit="batch", leave=False,
                      disable=not progress):
        x, _ = data.batch(slice(start, start + batch_size))
        out.append(model(x.to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                    steps: int = 10, batch_size: int = 256) -> float:
    """Accuracy on ``x`` under PGD-``steps`` at radius ``eps`` (α = ε/4): the share of images the
    model gets right and PGD cannot move off their label."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    right = 0
    try:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            x_adv = pgd(model, xb, yb, eps=eps, alpha=eps / 4, steps=steps, norm=norm)
            with torch.no_grad():
                right += int((model(x_adv).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return right / max(len(x), 1)


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 512,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy on ``data``."""
    return float((predict(model, data, batch_size, device) == data.labels).float().mean())
