"""ResNets (He et al., 2016) as in torchvision: ResNet-18 (basic blocks,
11,689,512 parameters at 1000 classes), ResNet-50 and ResNet-101
(bottleneck blocks with the stride on the 3x3 convolution, "ResNet v1.5":
25,557,032 and 44,549,160 parameters).  Node names follow torchvision's
module names: ``layer2.0.conv1``, ``layer2.0.bn1``, ``layer2.0.downsample.conv``..."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head


def _join(g, x, y, out_channels, stride, name):
    """The end of a residual block: y plus the shortcut (x itself, or a 1x1
    strided projection + BN when the shape changes), then ReLU."""
    short = x
    if stride != 1 or g[x].shape[1] != out_channels:
        short = g.conv(x, out_channels, 1, stride=stride, bias=False, name=f"{name}.downsample.conv")
        short = g.bn(short, name=f"{name}.downsample.bn")
    y = g.add_([y, short], name=f"{name}.add")
    return g.relu(y, name=f"{name}.relu")


def basic_block(g, x, out_channels, stride, name):
    """Two 3x3 conv+BN, identity shortcut or a 1x1 strided projection+BN when
    the shape changes; add, then ReLU.  Expansion 1."""
    y = g.conv(x, out_channels, 3, stride=stride, padding=1, bias=False, name=f"{name}.conv1")
    y = g.relu(g.bn(y, name=f"{name}.bn1"), name=f"{name}.relu1")
    y = g.conv(y, out_channels, 3, padding=1, bias=False, name=f"{name}.conv2")
    y = g.bn(y, name=f"{name}.bn2")
    return _join(g, x, y, out_channels, stride, name)


def bottleneck_block(g, x, width, stride, name, expansion=4):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN; projection
    shortcut when the shape changes; add, then ReLU."""
    out_channels = width * expansion
    y = g.conv(x, width, 1, bias=False, name=f"{name}.conv1")
    y = g.relu(g.bn(y, name=f"{name}.bn1"), name=f"{name}.relu1")
    y = g.conv(y, width, 3, stride=stride, padding=1, bias=False, name=f"{name}.conv2")
    y = g.relu(g.bn(y, name=f"{name}.bn2"), name=f"{name}.relu2")
    y = g.conv(y, out_channels, 1, bias=False, name=f"{name}.conv3")
    y = g.bn(y, name=f"{name}.bn3")
    return _join(g, x, y, out_channels, stride, name)


def _resnet(name, block, layers, batch, in_channels, image_size, num_classes, width=64) -> Graph:
    """``width``: channels of the stem and the first stage (torchvision: 64);
    the stages have width x (1, 2, 4, 8)."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = g.conv(x, width, 7, stride=2, padding=3, bias=False, name="conv1")
    x = g.relu(g.bn(x, name="bn1"), name="relu")
    x = g.maxpool(x, 3, stride=2, padding=1, name="maxpool")
    for li, (blocks, width) in enumerate(zip(layers, (width, 2 * width, 4 * width, 8 * width)), 1):
        for bi in range(blocks):
            stride = 2 if (li > 1 and bi == 0) else 1
            x = block(g, x, width, stride, f"layer{li}.{bi}")
    x = g.global_avgpool(x, name="avgpool")
    classifier_head(g, x, num_classes, name="fc")
    return g


def resnet18(batch, in_channels, image_size, num_classes, name="resnet18", width=64) -> Graph:
    return _resnet(name, basic_block, (2, 2, 2, 2), batch, in_channels, image_size, num_classes, width)


def resnet50(batch, in_channels, image_size, num_classes, name="resnet50") -> Graph:
    return _resnet(name, bottleneck_block, (3, 4, 6, 3), batch, in_channels, image_size, num_classes)


def resnet101(batch, in_channels, image_size, num_classes, name="resnet101") -> Graph:
    return _resnet(name, bottleneck_block, (3, 4, 23, 3), batch, in_channels, image_size, num_classes)
