"""AlexNet as in torchvision (the one-GPU variant of Krizhevsky 2014,
"One weird trick"): 61,100,840 parameters at 1000 classes, 3x224x224 input.
Dropout sits before the first two fully connected layers, as in torchvision.
See pooling.py for what replaces the adaptive average pool at other sizes."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head
from hpcnn.models.pooling import adaptive_pool_standin


def alexnet(batch, in_channels, image_size, num_classes, name="alexnet") -> Graph:
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    convs = [  # (name, out, kernel, stride, padding, pool after)
        ("conv1", 64, 11, 4, 2, True),
        ("conv2", 192, 5, 1, 2, True),
        ("conv3", 384, 3, 1, 1, False),
        ("conv4", 256, 3, 1, 1, False),
        ("conv5", 256, 3, 1, 1, True),
    ]
    pools = 0
    for cname, out, k, s, p, pool in convs:
        x = g.relu(g.conv(x, out, k, stride=s, padding=p, name=cname), name=f"{cname}.relu")
        if pool:
            pools += 1
            x = g.maxpool(x, 3, stride=2, name=f"pool{pools}")
    x = adaptive_pool_standin(g, x, 6)
    x = g.flatten(x, name="flatten")
    x = g.dropout(x, 0.5, name="drop1")
    x = g.relu(g.linear(x, 4096, name="fc1"), name="fc1.relu")
    x = g.dropout(x, 0.5, name="drop2")
    x = g.relu(g.linear(x, 4096, name="fc2"), name="fc2.relu")
    classifier_head(g, x, num_classes, name="fc")
    return g
