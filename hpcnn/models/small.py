"""Small networks for tests and examples: fast enough in float64 on one CPU
core to run many training steps, yet with every structural feature the
distributed runtime must handle (batch norm, residual adds, strided
projections, multi-branch concatenation, pooling branches, dropout)."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head, conv_bn_relu
from hpcnn.models.resnet import basic_block


def resnet_small(batch, in_channels, image_size, num_classes, name="resnet_small") -> Graph:
    """3x3 stem (8 channels) + BN + ReLU; basic block 8 -> 8 (identity
    shortcut); basic block 8 -> 16 with stride 2 and a 1x1 projection
    shortcut; basic block 16 -> 16; global average pool; fc."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = conv_bn_relu(g, x, 8, 3, "conv1", padding=1)
    x = basic_block(g, x, 8, 1, "layer1.0")
    x = basic_block(g, x, 16, 2, "layer2.0")
    x = basic_block(g, x, 16, 1, "layer2.1")
    x = g.global_avgpool(x, name="avgpool")
    classifier_head(g, x, num_classes, name="fc")
    return g


def inception_small(batch, in_channels, image_size, num_classes, name="inception_small") -> Graph:
    """3x3 stem (8 channels); an Inception-A-like block with four branches
    (1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 average pool -> 1x1) joined by concat;
    a reduction block (3x3 stride-2 conv beside a 3x3 stride-2 max pool);
    global average pool; fc.  Every conv is conv + BN + ReLU."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = conv_bn_relu(g, x, 8, 3, "stem", padding=1)
    b1 = conv_bn_relu(g, x, 8, 1, "mixed1.branch1x1")
    b3 = conv_bn_relu(g, x, 8, 1, "mixed1.branch3x3_1")
    b3 = conv_bn_relu(g, b3, 12, 3, "mixed1.branch3x3_2", padding=1)
    b5 = conv_bn_relu(g, x, 4, 1, "mixed1.branch5x5_1")
    b5 = conv_bn_relu(g, b5, 8, 5, "mixed1.branch5x5_2", padding=2)
    bp = g.avgpool(x, 3, stride=1, padding=1, name="mixed1.branch_pool_avg")
    bp = conv_bn_relu(g, bp, 8, 1, "mixed1.branch_pool")
    x = g.concat([b1, b3, b5, bp], name="mixed1.concat")
    r3 = conv_bn_relu(g, x, 24, 3, "reduce.branch3x3", stride=2)
    rp = g.maxpool(x, 3, stride=2, name="reduce.branch_pool")
    x = g.concat([r3, rp], name="reduce.concat")
    x = g.global_avgpool(x, name="avgpool")
    classifier_head(g, x, num_classes, name="fc")
    return g


def digits_cnn(batch, in_channels, image_size, num_classes, name="digits_cnn") -> Graph:
    """For the 1x16x16 digits data: conv 16@3x3 (pad 1) + BN + ReLU + 2x2 max
    pool; conv 32@3x3 (pad 1) + BN + ReLU + 2x2 max pool; flatten; dropout
    0.25; fc."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = conv_bn_relu(g, x, 16, 3, "conv1", padding=1)
    x = g.maxpool(x, 2, name="pool1")
    x = conv_bn_relu(g, x, 32, 3, "conv2", padding=1)
    x = g.maxpool(x, 2, name="pool2")
    x = g.flatten(x, name="flatten")
    x = g.dropout(x, 0.25, name="dropout")
    classifier_head(g, x, num_classes, name="fc")
    return g


def mobilenet_small(batch, in_channels, image_size, num_classes, name="mobilenet_small") -> Graph:
    """Depthwise-separable network (MobileNet-like): 3x3 stem (8 channels);
    depthwise 3x3 (8 groups) + pointwise 1x1 to 16; depthwise 3x3 stride 2
    with channel multiplier 2 (16 -> 32) + pointwise to 24; an inverted
    residual (depthwise 3x3 + pointwise 1x1, added to its input); a grouped
    3x3 conv (4 groups, 24 -> 32); global average pool; fc.  Every conv is
    conv + BN (+ ReLU)."""
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = conv_bn_relu(g, x, 8, 3, "stem", padding=1)
    x = conv_bn_relu(g, x, 8, 3, "block1.dw", padding=1, groups=8)
    x = conv_bn_relu(g, x, 16, 1, "block1.pw")
    x = conv_bn_relu(g, x, 32, 3, "block2.dw", stride=2, padding=1, groups=16)
    x = conv_bn_relu(g, x, 24, 1, "block2.pw")
    y = conv_bn_relu(g, x, 24, 3, "block3.dw", padding=1, groups=24)
    y = conv_bn_relu(g, y, 24, 1, "block3.pw", relu=False)
    x = g.relu(g.add_([x, y], name="block3.add"), name="block3.relu")
    x = conv_bn_relu(g, x, 32, 3, "grouped", padding=1, groups=4)
    x = g.global_avgpool(x, name="avgpool")
    classifier_head(g, x, num_classes, name="fc")
    return g
