"""Inception-v3 (Szegedy et al., 2016) as in torchvision, without the
auxiliary classifier: 23,834,568 parameters at 1000 classes (torchvision's
27,161,264 minus the 3,326,696 of its aux head), 3x299x299 input.

Every convolution is torchvision's BasicConv2d: conv without bias, batch
norm with eps 0.001, ReLU.  The pooling branches of the A, C and E blocks
average over 3x3 windows with stride 1 and padding 1 counting the padding
as zeros (PyTorch's avg_pool2d default).  Node names follow torchvision:
``Mixed_5b.branch5x5_2``, ``Mixed_7c.branch3x3dbl_3a``..."""
from __future__ import annotations

from hpcnn.graph import Graph
from hpcnn.models.blocks import classifier_head, conv_bn_relu

BN_EPS = 1e-3


def basic_conv(g, x, out_channels, kernel_size, name, stride=1, padding=0):
    return conv_bn_relu(g, x, out_channels, kernel_size, name, stride=stride,
                        padding=padding, eps=BN_EPS)


def _pool_branch(g, x, out_channels, name):
    p = g.avgpool(x, 3, stride=1, padding=1, name=f"{name}.branch_pool_avg")
    return basic_conv(g, p, out_channels, 1, f"{name}.branch_pool")


def inception_a(g, x, pool_features, name):
    b1 = basic_conv(g, x, 64, 1, f"{name}.branch1x1")
    b5 = basic_conv(g, x, 48, 1, f"{name}.branch5x5_1")
    b5 = basic_conv(g, b5, 64, 5, f"{name}.branch5x5_2", padding=2)
    b3 = basic_conv(g, x, 64, 1, f"{name}.branch3x3dbl_1")
    b3 = basic_conv(g, b3, 96, 3, f"{name}.branch3x3dbl_2", padding=1)
    b3 = basic_conv(g, b3, 96, 3, f"{name}.branch3x3dbl_3", padding=1)
    bp = _pool_branch(g, x, pool_features, name)
    return g.concat([b1, b5, b3, bp], name=f"{name}.concat")


def inception_b(g, x, name):
    b3 = basic_conv(g, x, 384, 3, f"{name}.branch3x3", stride=2)
    bd = basic_conv(g, x, 64, 1, f"{name}.branch3x3dbl_1")
    bd = basic_conv(g, bd, 96, 3, f"{name}.branch3x3dbl_2", padding=1)
    bd = basic_conv(g, bd, 96, 3, f"{name}.branch3x3dbl_3", stride=2)
    bp = g.maxpool(x, 3, stride=2, name=f"{name}.branch_pool")
    return g.concat([b3, bd, bp], name=f"{name}.concat")


def inception_c(g, x, c7, name):
    b1 = basic_conv(g, x, 192, 1, f"{name}.branch1x1")
    b7 = basic_conv(g, x, c7, 1, f"{name}.branch7x7_1")
    b7 = basic_conv(g, b7, c7, (1, 7), f"{name}.branch7x7_2", padding=(0, 3))
    b7 = basic_conv(g, b7, 192, (7, 1), f"{name}.branch7x7_3", padding=(3, 0))
    bd = basic_conv(g, x, c7, 1, f"{name}.branch7x7dbl_1")
    bd = basic_conv(g, bd, c7, (7, 1), f"{name}.branch7x7dbl_2", padding=(3, 0))
    bd = basic_conv(g, bd, c7, (1, 7), f"{name}.branch7x7dbl_3", padding=(0, 3))
    bd = basic_conv(g, bd, c7, (7, 1), f"{name}.branch7x7dbl_4", padding=(3, 0))
    bd = basic_conv(g, bd, 192, (1, 7), f"{name}.branch7x7dbl_5", padding=(0, 3))
    bp = _pool_branch(g, x, 192, name)
    return g.concat([b1, b7, bd, bp], name=f"{name}.concat")


def inception_d(g, x, name):
    b3 = basic_conv(g, x, 192, 1, f"{name}.branch3x3_1")
    b3 = basic_conv(g, b3, 320, 3, f"{name}.branch3x3_2", stride=2)
    b7 = basic_conv(g, x, 192, 1, f"{name}.branch7x7x3_1")
    b7 = basic_conv(g, b7, 192, (1, 7), f"{name}.branch7x7x3_2", padding=(0, 3))
    b7 = basic_conv(g, b7, 192, (7, 1), f"{name}.branch7x7x3_3", padding=(3, 0))
    b7 = basic_conv(g, b7, 192, 3, f"{name}.branch7x7x3_4", stride=2)
    bp = g.maxpool(x, 3, stride=2, name=f"{name}.branch_pool")
    return g.concat([b3, b7, bp], name=f"{name}.concat")


def inception_e(g, x, name):
    b1 = basic_conv(g, x, 320, 1, f"{name}.branch1x1")
    b3 = basic_conv(g, x, 384, 1, f"{name}.branch3x3_1")
    b3a = basic_conv(g, b3, 384, (1, 3), f"{name}.branch3x3_2a", padding=(0, 1))
    b3b = basic_conv(g, b3, 384, (3, 1), f"{name}.branch3x3_2b", padding=(1, 0))
    b3 = g.concat([b3a, b3b], name=f"{name}.branch3x3")
    bd = basic_conv(g, x, 448, 1, f"{name}.branch3x3dbl_1")
    bd = basic_conv(g, bd, 384, 3, f"{name}.branch3x3dbl_2", padding=1)
    bda = basic_conv(g, bd, 384, (1, 3), f"{name}.branch3x3dbl_3a", padding=(0, 1))
    bdb = basic_conv(g, bd, 384, (3, 1), f"{name}.branch3x3dbl_3b", padding=(1, 0))
    bd = g.concat([bda, bdb], name=f"{name}.branch3x3dbl")
    bp = _pool_branch(g, x, 192, name)
    return g.concat([b1, b3, bd, bp], name=f"{name}.concat")


def inception_v3(batch, in_channels, image_size, num_classes, name="inception_v3") -> Graph:
    g = Graph(name)
    x = g.input((batch, in_channels) + tuple(image_size))
    x = basic_conv(g, x, 32, 3, "Conv2d_1a_3x3", stride=2)
    x = basic_conv(g, x, 32, 3, "Conv2d_2a_3x3")
    x = basic_conv(g, x, 64, 3, "Conv2d_2b_3x3", padding=1)
    x = g.maxpool(x, 3, stride=2, name="maxpool1")
    x = basic_conv(g, x, 80, 1, "Conv2d_3b_1x1")
    x = basic_conv(g, x, 192, 3, "Conv2d_4a_3x3")
    x = g.maxpool(x, 3, stride=2, name="maxpool2")
    x = inception_a(g, x, 32, "Mixed_5b")
    x = inception_a(g, x, 64, "Mixed_5c")
    x = inception_a(g, x, 64, "Mixed_5d")
    x = inception_b(g, x, "Mixed_6a")
    x = inception_c(g, x, 128, "Mixed_6b")
    x = inception_c(g, x, 160, "Mixed_6c")
    x = inception_c(g, x, 160, "Mixed_6d")
    x = inception_c(g, x, 192, "Mixed_6e")
    x = inception_d(g, x, "Mixed_7a")
    x = inception_e(g, x, "Mixed_7b")
    x = inception_e(g, x, "Mixed_7c")
    x = g.global_avgpool(x, name="avgpool")
    x = g.dropout(x, 0.5, name="dropout")
    classifier_head(g, x, num_classes, name="fc")
    return g
