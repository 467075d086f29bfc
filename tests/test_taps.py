"""Taps: outputs, inputs and true pre-activations, also under in-place ReLU."""

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.taps import LOGITS, Tap, capture, run_with_taps


class TVBlock(nn.Module):
    """A torchvision-style BasicBlock: one in-place ReLU used twice, functional `+=`."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class TVNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(TVBlock(), TVBlock())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))


def _manual_preact(block: TVBlock, x: torch.Tensor) -> torch.Tensor:
    out = torch.relu(block.bn1(block.conv1(x)))
    return block.bn2(block.conv2(out)) + x


def test_preact_under_inplace_relu_has_negative_values():
    torch.manual_seed(0)
    net = TVNet().eval()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        block_in = net.stem(x)
        block_in = net.layer1[0](block_in)
        expected = _manual_preact(net.layer1[1], block_in)
    logits, feats = run_with_taps(net, x, {"pre": Tap("layer1.1", "preact"),
                                           "stage": Tap("layer1", "preact")})
    assert (feats["pre"] < 0).any(), "pre-activation must keep negative values"
    torch.testing.assert_close(feats["pre"], expected)
    torch.testing.assert_close(feats["stage"], expected)  # a stage ends with its last block
    assert logits.shape == (2, 3)


def test_naive_hook_sees_post_relu_values():
    """Documents the bug the clone prevents: a stored reference is overwritten in place."""
    net = TVNet().eval()
    seen = {}
    h = net.layer1[1].relu.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        net(torch.randn(2, 1, 6, 6))
    h.remove()
    assert (seen["x"] >= 0).all()


def test_output_and_input_taps_and_gradients():
    torch.manual_seed(1)
    net = TVNet()
    x = torch.randn(2, 1, 6, 6)
    logits, feats = run_with_taps(net, x, {"o": Tap("stem"), "i": Tap("fc", "input"),
                                           "z": LOGITS})
    torch.testing.assert_close(feats["o"], net.stem(x))
    assert feats["i"].shape == (2, 4)
    assert feats["z"] is logits
    feats["o"].sum().backward()
    assert net.stem.weight.grad is not None and net.stem.weight.grad.abs().sum() > 0


def test_output_tap_not_overwritten_by_later_inplace_relu():
    net = TVNet().eval()
    _, feats = run_with_taps(net, torch.randn(2, 1, 6, 6), {"bn": Tap("layer1.1.bn1")})
    assert (feats["bn"] < 0).any()  # bn1's output is later relu'd in place


def test_hooks_removed_on_exit_even_after_error():
    net = TVNet()
    with pytest.raises(RuntimeError), capture(net, {"a": Tap("layer1.0", "preact")}):
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0
               for m in net.modules())


def test_unknown_path_lists_modules():
    with pytest.raises(KdkitError, match="has no module 'layer9'.*layer1"):
        run_with_taps(TVNet(), torch.randn(1, 1, 6, 6), {"x": Tap("layer9")})


def test_preact_without_relu_is_refused():
    with pytest.raises(KdkitError, match="no nn.ReLU module"):
        run_with_taps(TVNet(), torch.randn(1, 1, 6, 6), {"x": Tap("fc", "preact")})


def test_preact_on_block_not_ending_in_relu_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(KdkitError, match="does not end with its last ReLU"):
        run_with_taps(net, torch.randn(2, 3), {"x": Tap("", "preact")})


def test_bad_read_kind():
    with pytest.raises(KdkitError, match="tap read"):
        Tap("fc", "weights")  # type: ignore[arg-type]


def test_a_preact_tap_passes_nan_on_for_the_loop_to_report():
    """A diverged network's NaN pre-activation is still its block's pre-activation (relu of
    NaN is NaN): the tap reads it, and the loop's NaN check names the term and step, rather
    than the tap claiming the block does not end with its ReLU (as AB's init stage did)."""
    net = TVNet().eval()
    x = torch.randn(2, 1, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    _, feats = run_with_taps(net, x, {"stage": Tap("layer1", "preact")})
    assert torch.isnan(feats["stage"]).any()
