"""The stand-in for torchvision's ``AdaptiveAvgPool2d`` before the AlexNet
and VGG classifiers (the graph has no adaptive pooling op).

At the default input size the feature map already has the target size and
the adaptive pool is the identity, so nothing is added.  When the feature
map is an exact multiple of the target (e.g. VGG-16 at 448x448: 14x14 ->
7x7) a plain average pool with kernel = stride = the ratio gives exactly
what the adaptive pool computes.  Otherwise (smaller inputs such as 32x32,
or sizes that are not multiples) the classifier reads the feature map as it
is: the first fully connected layer then has C*H*W inputs instead of
C*6*6 / C*7*7, so the parameter count differs from torchvision's.  The
choice is recorded in ``graph.meta['classifier_pool']``.
"""
from __future__ import annotations


def adaptive_pool_standin(g, x, target, name="avgpool"):
    _, c, h, w = g[x].shape
    if (h, w) == (target, target):
        g.meta["classifier_pool"] = "identity (feature map already %dx%d)" % (target, target)
        return x
    if h % target == 0 and w % target == 0 and h >= target and w >= target:
        kh, kw = h // target, w // target
        g.meta["classifier_pool"] = f"avgpool {kh}x{kw} (feature map {h}x{w} -> {target}x{target})"
        return g.avgpool(x, (kh, kw), stride=(kh, kw), name=name)
    g.meta["classifier_pool"] = (f"none: feature map {h}x{w} is not a multiple of {target}x{target}; "
                                 f"the first fc reads all {c * h * w} features")
    return x
