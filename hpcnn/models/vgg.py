"""VGG-16 (configuration D of Simonyan & Zisserman, without batch norm) as in
torchvision: 138,357,544 parameters at 1000 classes, 3x224x224 input.  See
pooling.py for what replaces the adaptive average pool at other sizes."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head
from hpcnn.models.pooling import adaptive_pool_standin

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16(batch, in_channels, image_size, num_classes, name="vgg16") -> Graph:
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    for si, stage in enumerate(VGG16_STAGES, 1):
        for ci, out in enumerate(stage, 1):
            cname = f"conv{si}_{ci}"
            x = g.relu(g.conv(x, out, 3, padding=1, name=cname), name=f"{cname}.relu")
        x = g.maxpool(x, 2, stride=2, name=f"pool{si}")
    x = adaptive_pool_standin(g, x, 7)
    x = g.flatten(x, name="flatten")
    x = g.relu(g.linear(x, 4096, name="fc1"), name="fc1.relu")
    x = g.dropout(x, 0.5, name="drop1")
    x = g.relu(g.linear(x, 4096, name="fc2"), name="fc2.relu")
    x = g.dropout(x, 0.5, name="drop2")
    classifier_head(g, x, num_classes, name="fc")
    return g
