"""MobileNet-V2 (Sandler et al., 2018) as in torchvision: a 3x3 stride-2
stem, 17 inverted-residual blocks (1x1 expansion, 3x3 depthwise, 1x1
linear projection; a residual add where the stride is 1 and the widths
match), a 1x1 convolution to 1280 channels, global average pooling,
dropout 0.2 and the classifier: 3,504,872 parameters at 1000 classes.
Activations are ReLU6 (``clip`` to [0, 6]).  Node names follow
torchvision's modules: ``features.3.conv.1.0`` is block 3's depthwise
convolution."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head

# (expansion t, output channels c, blocks n, first stride s)
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)]


def _conv_bn(g, x, cout, k, name, stride=1, groups=1, relu6=True):
    y = g.conv(x, cout, k, stride=stride, padding=(k - 1) // 2, bias=False, groups=groups, name=f"{name}.0")
    y = g.bn(y, name=f"{name}.1")
    return g.clip(y, 0.0, 6.0, name=f"{name}.2") if relu6 else y


def mobilenet_v2(batch, in_channels, image_size, num_classes, name="mobilenet_v2") -> Graph:
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = _conv_bn(g, x, 32, 3, "features.0", stride=2)
    cin, idx = 32, 1
    for t, c, n, s in _SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            pre = f"features.{idx}.conv"
            hidden = cin * t
            y, j = x, 0
            if t != 1:
                y = _conv_bn(g, y, hidden, 1, f"{pre}.0")
                j = 1
            y = _conv_bn(g, y, hidden, 3, f"{pre}.{j}", stride=stride, groups=hidden)
            y = g.conv(y, c, 1, bias=False, name=f"{pre}.{j + 1}")
            y = g.bn(y, name=f"{pre}.{j + 2}")
            x = g.add_([x, y], name=f"features.{idx}.add") if stride == 1 and cin == c else y
            cin, idx = c, idx + 1
    x = _conv_bn(g, x, 1280, 1, f"features.{idx}")
    x = g.global_avgpool(x, name="avgpool")
    x = g.dropout(x, 0.2, name="classifier.0")
    classifier_head(g, x, num_classes, name="classifier.1")
    return g
