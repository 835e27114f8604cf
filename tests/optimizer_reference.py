"""Reference optimisers for the tests, written from the papers' formulas on
whole NumPy tensors, independently of hpcnn.runtime.optimizers: one
parameter at a time, norms by numpy.linalg.norm.

    AdamW  Loshchilov & Hutter, "Decoupled weight decay regularization"
           (ICLR 2019), Algorithm 2, with PyTorch's placement of eps
    LARS   You, Gitman & Ginsburg, "Large batch training of convolutional
           networks" (2017), Algorithm 1 (with momentum)
    LAMB   You et al., "Large batch optimization for deep learning:
           training BERT in 76 minutes" (ICLR 2020), Algorithm 2, phi = identity
    clip   the global-norm rule of torch.nn.utils.clip_grad_norm_

Parameters and gradients are {node: {name: array}}; ``exclude`` names the
(node, name) pairs that get no weight decay and a trust ratio of 1."""
from __future__ import annotations

import numpy as np


def clip_global(grads, max_norm):
    """(clipped grads, total norm)."""
    total = np.sqrt(sum(float(np.sum(np.square(g))) for gs in grads.values() for g in gs.values()))
    coef = min(1.0, max_norm / (total + 1e-6))
    return {n: {k: g * coef for k, g in gs.items()} for n, gs in grads.items()}, total


class RefAdamW:
    def __init__(self, lr, betas, eps, wd, exclude=()):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.exclude = set(exclude)
        self.m, self.v, self.t = {}, {}, 0

    def step(self, params, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        for n, gs in grads.items():
            for k, g in gs.items():
                key = (n, k)
                w = params[n][k]
                wd = 0.0 if key in self.exclude else self.wd
                m = self.b1 * self.m.get(key, 0.0) + (1 - self.b1) * g
                v = self.b2 * self.v.get(key, 0.0) + (1 - self.b2) * g ** 2
                self.m[key], self.v[key] = m, v
                mhat = m / (1 - self.b1 ** self.t)
                vhat = v / (1 - self.b2 ** self.t)
                # eta_t = lr; decay decoupled from the adaptive step
                params[n][k] = w - lr * wd * w - lr * mhat / (np.sqrt(vhat) + self.eps)


class RefLARS:
    def __init__(self, lr, momentum, wd, eta, exclude=()):
        self.lr, self.mom, self.wd, self.eta = lr, momentum, wd, eta
        self.exclude = set(exclude)
        self.v = {}

    def step(self, params, grads, lr=None):
        lr = self.lr if lr is None else lr
        for n, gs in grads.items():
            for k, g in gs.items():
                key = (n, k)
                w = params[n][k]
                if key in self.exclude:
                    local, wd = 1.0, 0.0
                else:
                    wd = self.wd
                    wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                    local = self.eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
                v = self.mom * self.v.get(key, 0.0) + lr * local * (g + wd * w)
                self.v[key] = v
                params[n][k] = w - v


class RefLAMB:
    def __init__(self, lr, betas, eps, wd, exclude=()):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.exclude = set(exclude)
        self.m, self.v, self.t = {}, {}, 0

    def step(self, params, grads, lr=None):
        lr = self.lr if lr is None else lr
        self.t += 1
        for n, gs in grads.items():
            for k, g in gs.items():
                key = (n, k)
                w = params[n][k]
                m = self.b1 * self.m.get(key, 0.0) + (1 - self.b1) * g
                v = self.b2 * self.v.get(key, 0.0) + (1 - self.b2) * g ** 2
                self.m[key], self.v[key] = m, v
                mhat = m / (1 - self.b1 ** self.t)
                vhat = v / (1 - self.b2 ** self.t)
                r = mhat / (np.sqrt(vhat) + self.eps)
                if key in self.exclude:
                    params[n][k] = w - lr * r
                    continue
                u = r + self.wd * w
                wn, un = np.linalg.norm(w), np.linalg.norm(u)
                ratio = wn / un if wn > 0 and un > 0 else 1.0
                params[n][k] = w - lr * ratio * u


def one_dimensional(params):
    """The (node, name) pairs of 1-D parameters (biases, batch norm)."""
    return {(n, k) for n, ps in params.items() for k, p in ps.items() if np.ndim(p) == 1}


def make_reference(kind, settings, params):
    """The reference of ``kind`` for hpcnn settings (the make_optimizer
    keywords the tests use)."""
    s = dict(settings)
    exclude = one_dimensional(params) if s.get("exclude_bias_and_norm") else ()
    wd = s.get("weight_decay", 0.0)
    if kind == "adamw":
        return RefAdamW(s["lr"], s.get("betas", (0.9, 0.999)), s.get("eps", 1e-8), wd, exclude)
    if kind == "lars":
        return RefLARS(s["lr"], s.get("momentum", 0.9), wd, s.get("trust_coefficient", 0.001), exclude)
    if kind == "lamb":
        return RefLAMB(s["lr"], s.get("betas", (0.9, 0.999)), s.get("eps", 1e-6), wd, exclude)
    raise ValueError(f"no reference for {kind}")
