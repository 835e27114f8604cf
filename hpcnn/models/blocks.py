"""Building blocks shared by the model families: small helpers that add a
few named nodes to a Graph and return the name of the last one."""
from __future__ import annotations


def conv_bn_relu(g, x, out_channels, kernel_size, name, stride=1, padding=0,
                 eps=1e-5, relu=True, groups=1):
    """conv (no bias; ``groups`` groups) -> batch norm -> ReLU, named
    ``name``, ``name.bn``, ``name.relu``."""
    y = g.conv(x, out_channels, kernel_size, stride=stride, padding=padding, bias=False, name=name,
               groups=groups)
    y = g.bn(y, name=f"{name}.bn", eps=eps)
    if relu:
        y = g.relu(y, name=f"{name}.relu")
    return y


def classifier_head(g, x, num_classes, name="fc"):
    """Logits ``name`` and the loss node "loss"."""
    logits = g.linear(x, num_classes, name=name)
    g.loss(logits, name="loss")
    return logits
