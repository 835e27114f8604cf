"""The torch.nn networks of the ONNX tests (tests/test_onnx.py and the MPI
equivalence of imported networks, tests/mpi/test_onnx_equivalence.py), and
their export to ONNX."""
import torch
from torch import nn


class SE(nn.Module):
    """Squeeze-and-excitation: global pool, 1x1 convs, sigmoid gate, multiply."""

    def __init__(self, c, r=2):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class Net(nn.Module):
    """Every op the importer maps, in one small classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(8, 4, 3, padding=2, dilation=2), nn.LeakyReLU(0.1))
        self.branch_b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU6())
        self.se = SE(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 6, (3, 1), padding=(1, 0))
        self.act2 = nn.Hardswish()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 4 * 4, 12)
        self.out = nn.Linear(12, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1) + x
        x = self.se(x)
        x = self.avg(self.pool(x))
        x = self.act2(self.conv2(x))
        x = torch.flatten(self.drop(x), 1)
        return self.out(torch.relu(self.fc(x)))


def export(model, path, shape=(2, 3, 16, 16), dynamo=False):
    model.eval()
    with torch.no_grad():
        for m in model.modules():            # statistics, scales and shifts that are not the defaults
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    if dynamo:                       # torch's default exporter (torch.export)
        batch = torch.export.Dim("batch", min=2)
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True, opset_version=18,
                          input_names=["image"], output_names=["logits"], dynamic_shapes=({0: batch},),
                          optimize=True, verbose=False)
    else:                            # the TorchScript exporter, batch norm kept (not folded)
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"], do_constant_folding=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return model


class Separable(nn.Module):
    """Depthwise (multiplier 1 and 2, stride 2) and grouped convolutions with
    batch norm, as MobileNet and ResNeXt blocks have them."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.dw2 = nn.Sequential(nn.Conv2d(12, 24, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=12),
                                 nn.BatchNorm2d(24), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = torch.relu(self.grouped(self.dw2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Residual(nn.Module):
    """A ResNet basic block with a projection shortcut (1x1 convolution of
    stride 2 and batch norm) and a MobileNet-v2 inverted residual (1x1
    expansion, depthwise 3x3, ReLU6, linear 1x1 projection, identity
    shortcut)."""

    def __init__(self, classes=5, width=8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                  nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * w))
        self.project = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        e = 4 * w
        self.inverted = nn.Sequential(nn.Conv2d(2 * w, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
                                      nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e),
                                      nn.ReLU6(), nn.Conv2d(e, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w))
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + self.project(x))
        x = x + self.inverted(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
