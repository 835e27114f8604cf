"""LeNet-5 (LeCun et al., 1998) in its common modern form: ReLU activations
and 2x2 max pooling instead of the original scaled tanh and trainable
subsampling.

    input 1x32x32
    conv1 6@5x5 -> relu -> maxpool 2x2      (6x14x14)
    conv2 16@5x5 -> relu -> maxpool 2x2     (16x5x5)
    fc1 120 -> relu -> fc2 84 -> relu -> fc classes

Parameters at 10 classes: 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706.
"""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head


def lenet5(batch, in_channels, image_size, num_classes, name="lenet5") -> Graph:
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = g.relu(g.conv(x, 6, 5, name="conv1"), name="conv1.relu")
    x = g.maxpool(x, 2, name="pool1")
    x = g.relu(g.conv(x, 16, 5, name="conv2"), name="conv2.relu")
    x = g.maxpool(x, 2, name="pool2")
    x = g.flatten(x, name="flatten")
    x = g.relu(g.linear(x, 120, name="fc1"), name="fc1.relu")
    x = g.relu(g.linear(x, 84, name="fc2"), name="fc2.relu")
    classifier_head(g, x, num_classes, name="fc")
    return g
