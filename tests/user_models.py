"""A user's own models, for the ``py:`` model source tests (imported as ``user_models``)."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int = 8, returns: str = "tensor"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, num_classes)
        self.returns = returns

    def forward(self, x):
        feats = self.relu(self.bn(self.conv(x))).mean((2, 3))
        logits = self.head(feats)
        if self.returns == "dict":
            return {"logits": logits, "features": feats}
        if self.returns == "tuple":
            return feats, logits
        if self.returns == "object":
            return Output(logits)
        return logits


class Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def tiny_net(num_classes: int, in_channels: int, width: int = 8, returns: str = "tensor"):
    return TinyNet(num_classes, in_channels, width, returns)


def not_a_model(**kwargs):
    return 42
