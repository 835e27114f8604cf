"""The three test networks of the equivalence tests.  Uses the model zoo
(hpcnn.models.build_model) when it is there, else equivalent small graphs
built here with the Graph API."""
from __future__ import annotations

from hpcnn.graph import Graph


def lenet5(batch):
    g = Graph("lenet5")
    x = g.input((batch, 1, 28, 28))
    x = g.relu(g.conv(x, 6, 5, padding=2, name="conv1"), name="relu1")
    x = g.maxpool(x, 2, name="pool1")
    x = g.relu(g.conv(x, 16, 5, name="conv2"), name="relu2")
    x = g.maxpool(x, 2, name="pool2")
    x = g.flatten(x, name="flatten")
    x = g.relu(g.linear(x, 120, name="fc1"), name="relu3")
    x = g.relu(g.linear(x, 84, name="fc2"), name="relu4")
    g.loss(g.linear(x, 10, name="fc3"))
    return g


def resnet_small(batch):
    g = Graph("resnet_small")
    x = g.input((batch, 3, 12, 12))
    x = g.relu(g.bn(g.conv(x, 8, 3, padding=1, bias=False, name="stem"), name="stem_bn"), name="stem_relu")
    # basic block with an identity shortcut
    y = g.relu(g.bn(g.conv(x, 8, 3, padding=1, bias=False, name="b1_conv1"), name="b1_bn1"), name="b1_relu1")
    y = g.bn(g.conv(y, 8, 3, padding=1, bias=False, name="b1_conv2"), name="b1_bn2")
    x = g.relu(g.add_([y, x], name="b1_add"), name="b1_relu2")
    # stride-2 block with a projection shortcut
    y = g.relu(g.bn(g.conv(x, 16, 3, stride=2, padding=1, bias=False, name="b2_conv1"), name="b2_bn1"), name="b2_relu1")
    y = g.bn(g.conv(y, 16, 3, padding=1, bias=False, name="b2_conv2"), name="b2_bn2")
    s = g.bn(g.conv(x, 16, 1, stride=2, bias=False, name="b2_short"), name="b2_short_bn")
    x = g.relu(g.add_([y, s], name="b2_add"), name="b2_relu2")
    x = g.global_avgpool(x, name="gap")
    g.loss(g.linear(x, 10, name="fc"))
    return g


def inception_small(batch):
    g = Graph("inception_small")
    x = g.input((batch, 3, 10, 10))
    x = g.relu(g.conv(x, 8, 3, padding=1, name="stem"), name="stem_relu")
    b1 = g.conv(x, 4, 1, name="b1_1x1")
    b2 = g.relu(g.conv(x, 4, 1, name="b2_1x1"), name="b2_relu")
    b2 = g.conv(b2, 6, 3, padding=1, name="b2_3x3")
    b3 = g.relu(g.conv(x, 4, 1, name="b3_1x1"), name="b3_relu")
    b3 = g.conv(b3, 4, 5, padding=2, name="b3_5x5")
    b4 = g.maxpool(x, 3, stride=1, padding=1, name="b4_pool")
    b4 = g.conv(b4, 4, 1, name="b4_1x1")
    x = g.relu(g.concat([b1, b2, b3, b4], name="concat"), name="mix_relu")
    x = g.avgpool(x, 2, name="pool")
    x = g.dropout(x, 0.25, name="drop")
    x = g.flatten(x, name="flatten")
    g.loss(g.linear(x, 10, name="fc"))
    return g


LOCAL = {"lenet5": lenet5, "resnet_small": resnet_small, "inception_small": inception_small}


def build(name, batch):
    try:
        from hpcnn.models import build_model
    except ImportError:
        return LOCAL[name](batch)
    return build_model(name, batch=batch)
