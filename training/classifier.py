"""Training a classifier with the standard recipe, and measuring its accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from detector.datasets import ImageDataset

__all__ = ["accuracy", "predict", "train_classifier"]


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
) -> nn.Module:
    """SGD (momentum 0.9, Nesterov), one-cycle schedule, crop+flip for images ≥ 32 px; on CUDA bf16
    autocast and channels-last memory (the layout tensor cores read), the data on the GPU, and no
    host synchronisation inside an epoch."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model.to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    if augment is None:
        augment = min(data.input_shape[1:]) >= 32
    steps_per_epoch = math.ceil(len(data) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if max(epochs, 1) * steps_per_epoch >= 8:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=max(epochs, 1),
                                                       steps_per_epoch=steps_per_epoch, pct_start=0.25)
    else:  # too few steps for a warm-up and a decay (OneCycleLR divides by zero at 4 steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    images = data.images.to(device)
    labels = data.labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(range(epochs), desc="train classifier", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(data), generator=generator).to(device)
        total = 0
        correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        batches = tqdm(range(0, len(data), batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       leave=False, disable=not progress)
        for start in batches:
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch norm cannot train on a lone example (a last batch of one)
                continue
            x = images[idx].float().div_(255)
            y = labels[idx]
            if augment:
                x = _augment(x, generator)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
        if total:
            bar.set_postfix(loss=f"{float(loss_sum) / total:.3f}", acc=f"{int(correct) / total:.3f}")
    if cuda:
        model.to(memory_format=torch.contiguous_format)  # the bundle's weights are saved in the usual layout
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


def accuracy(model: nn.Module, data: ImageDataset, batch_size: int = 512,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy on ``data``."""
    return float((predict(model, data, batch_size, device) == data.labels).float().mean())
