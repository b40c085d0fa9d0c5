"""A classifier the project does not ship, for the bring-your-own-model tests.

It is written the way a user's research code often is: it expects inputs normalised with its own
mean/std, its output layer is called ``classifier`` and an auxiliary head registered AFTER it is the
model's last ``nn.Linear`` (so ψ needs ``--layer classifier``), and its factory takes its own
keyword arguments.  Nothing in it knows about the detector.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, hidden),
            nn.Tanh(),
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.confidence = nn.Linear(hidden, 1)  # an auxiliary head, not the classifier's output
        self.last_confidence: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        self.last_confidence = torch.sigmoid(self.confidence(h)).detach()
        return self.classifier(h)


def make_digits_net(hidden: int = 64, num_classes: int = 10) -> DigitsNet:
    return DigitsNet(hidden, num_classes)


class FaultyNet(nn.Module):
    """A small digits network that fails the way a production model can, on purpose:

    - an all-white image (every pixel 1.0) makes the forward pass raise, for that batch only (a
      poison input);
    - an image of pixels 64/255 breaks it for good, as a device fault would: every later forward
      pass raises.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32),
                                  nn.ReLU())
        self.fc = nn.Linear(32, num_classes)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        if bool(((flat - 64 / 255).abs() < 1e-3).all(dim=1).any()):
            self.broken = True
        if self.broken:
            raise RuntimeError("device fault: the model no longer runs")
        if bool((flat >= 1.0).all(dim=1).any()):
            raise RuntimeError("poison input")
        return self.fc(self.body(x))


def make_faulty_net(num_classes: int = 10) -> FaultyNet:
    return FaultyNet(num_classes)


def make_strict_net(depth: int = 18) -> DigitsNet:
    """A factory that checks its arguments with an assert, as research code often does."""
    assert depth in (18, 34), f"depth must be 18 or 34, got {depth}"
    return DigitsNet()
