"""Optimisers that update one rank's shards of every parameter: SGD, AdamW,
LARS and LAMB, with clipping by the global gradient norm.

Under a plan a layer's parameters are split along their output channels
(axis 0, the layer's c degree) and replicated over its n, h and w degrees.
Elementwise updates (SGD, AdamW, the moments of LAMB) need nothing but the
shard.  What is not elementwise is a norm:

* LARS and LAMB scale each parameter's step by a trust ratio made of the
  norms of the WHOLE logical parameter (and of its gradient or update);
* clipping scales every gradient by one factor made of the norm of the
  whole network's gradient.

The sums of squares behind these norms are taken on the shards and summed
by a *norm reducer*: ``WholeTensors`` when the arrays are whole tensors (the
sequential model, one process) and ``hpcnn.runtime.shard_norms.ShardNorms``
under a plan, which sums each layer's values over the ranks that hold its
channel shards (the layer's c-direction group: one rank per shard, so
replicas are not counted twice) and the network's total over the layers,
each layer counted once.  ``attach(model)`` picks the reducer that fits the
model; the per-layer norms and clipping refuse to run without one, since
a norm of a shard taken for the norm of the tensor is silently wrong.

State (momentum, Adam moments) is held per parameter in ``state[name][key]``
('node.param' keys), with the shape of this rank's shard, so checkpoints
write and read it as whole logical tensors like the parameters themselves;
``steps`` counts the updates (Adam's and LAMB's bias correction).

Rules of the four kinds, as this module implements them (lr is the
schedule's learning rate of the step, wd the weight decay, g the gradient
after clipping, w the parameter):

* ``sgd``: PyTorch's SGD (dampening 0): L2 weight decay ``g + wd w`` (or,
  decoupled, ``w *= 1 - lr wd`` first), momentum buffer ``b = m b + g``,
  Nesterov ``g + m b``, ``w -= lr b``.
* ``adamw``: PyTorch's AdamW: decoupled ``w *= 1 - lr wd`` (or L2, Adam's
  ``g + wd w``), ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
  ``w -= lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps)``.
* ``lars``: You, Gitman and Ginsburg (2017), Algorithm 1: trust ratio
  ``eta ||w|| / (||g|| + wd ||w||)`` (1 when ||w|| or ||g|| is 0),
  velocity ``v = m v + lr trust (g + wd w)``, ``w -= v``.  The velocity
  includes the learning rate, as in the paper.
* ``lamb``: You et al. (2019), Algorithm 2: Adam's bias-corrected moments,
  ``r = m^ / (sqrt(v^) + eps)``, decoupled ``u = r + wd w`` (or L2, the
  decay added to g before the moments), trust ratio ``||w|| / ||u||`` (1
  when either is 0), ``w -= lr trust u``.

``exclude_bias_and_norm``: one-dimensional parameters (biases, batch-norm
scale and shift) get no weight decay and, under LARS and LAMB, a trust
ratio of 1.

Clipping (``clip_norm`` > 0) follows torch.nn.utils.clip_grad_norm_:
``total = sqrt(sum of every gradient's squares)``, and every gradient is
multiplied by ``min(1, clip_norm / (total + 1e-6))``; ``last_grad_norm``
holds the total of the last step.
"""
from __future__ import annotations

import math

import numpy as np

from hpcnn.backend import array_module, to_host

KINDS = ("sgd", "adamw", "lars", "lamb")
DECAY_MODES = ("auto", "l2", "decoupled")


class OptimizerError(ValueError):
    """A bad optimiser setting, or an optimiser used where its norms would be wrong."""


class WholeTensors:
    """The norm reducer of whole tensors (one process): every layer's sums
    are already whole and the total is their sum."""

    def layer_sums(self, local: dict) -> dict:
        return dict(local)

    def total(self, values: dict) -> float:
        t = 0.0
        for v in values.values():
            t += float(v)
        return t

    def free(self):
        pass


def _sq(a):
    """Sum of squares of an array on its device (a 0-d array)."""
    return (a * a).sum()


class Optimizer:
    """The common part of the four kinds: settings, state, attachment to a
    model, clipping, and the update of ``step_nodes`` (which every executor
    calls with {node: {name: shard}} of parameters and gradients)."""

    kind = ""
    #: whether the update needs per-parameter norms of whole tensors
    layerwise = False

    def __init__(self, lr=0.1, weight_decay=0.0, clip_norm=0.0, exclude_bias_and_norm=False,
                 weight_decay_mode="auto"):
        _positive("lr", lr)
        _nonneg("weight_decay", weight_decay)
        _nonneg("clip_norm", clip_norm)
        if weight_decay_mode not in DECAY_MODES:
            raise OptimizerError(f"optimiser weight_decay_mode must be one of {', '.join(DECAY_MODES)}, "
                                 f"got {weight_decay_mode!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.clip_norm = float(clip_norm)
        self.exclude_bias_and_norm = bool(exclude_bias_and_norm)
        self.decoupled = self._decoupled(weight_decay_mode)
        self.state: dict[str, dict] = {name: {} for name in self.state_names}
        self.steps = 0
        self.norms = None            # the norm reducer (attach)
        self._params = None          # the params dict of the attached model
        self.last_grad_norm: float | None = None

    # ---- what a kind declares ------------------------------------------------
    @property
    def state_names(self) -> tuple:
        """Names of the per-parameter state buffers (checkpointed as
        /optimizer/<name>/<layer>/<param>)."""
        return ()

    def _decoupled(self, mode) -> bool:
        return mode == "decoupled"

    @property
    def needs_norms(self) -> bool:
        return self.layerwise or self.clip_norm > 0

    def describe(self) -> str:
        return f"{self.kind} lr {self.lr:g}"

    # ---- attachment ---------------------------------------------------------------
    def attach(self, model) -> "Optimizer":
        """Bind this optimiser to ``model`` (a SequentialModel or a
        DistributedModel): its norms are then summed over the right ranks
        (collective for a distributed model when norms are needed).
        Returns self."""
        self.free()
        if self.needs_norms:
            from hpcnn.runtime.shard_norms import norms_for
            self.norms = norms_for(model)
        self._params = model.params
        return self

    def free(self):
        """Release what ``attach`` made (collective for a distributed model)."""
        if self.norms is not None:
            self.norms.free()
        self.norms = None
        self._params = None

    def _check_attached(self, params):
        if self._params is not None and params is not self._params:
            raise OptimizerError(f"this {self.kind} optimiser is attached to another model; "
                                 f"attach it to the model it updates (optimizer.attach(model))")
        if self.needs_norms and self.norms is None:
            what = "layer-wise trust ratios" if self.layerwise else "clipping by the global norm"
            raise OptimizerError(f"{self.kind} with {what} needs the norms of whole parameters: call "
                                 f"optimizer.attach(model) with the model it updates before the first step")

    # ---- norms -----------------------------------------------------------------------
    def _layer_sq_norms(self, arrays: dict) -> dict:
        """{node: [arrays]} of this rank's shards -> {node: float64 vector}
        of the squared norms of the WHOLE tensors (reduced over the ranks
        that hold the layer's channel shards)."""
        nodes = [n for n, arrs in arrays.items() if arrs]
        if not nodes:
            return self.norms.layer_sums({})
        first = next(iter(arrays[nodes[0]]))
        xp = array_module(first)
        flat = [_sq(a) for n in nodes for a in arrays[n]]
        host = np.asarray(to_host(xp.stack(flat)), dtype=np.float64).reshape(-1)
        local, off = {}, 0
        for n in nodes:
            k = len(arrays[n])
            local[n] = host[off:off + k]
            off += k
        return self.norms.layer_sums(local)

    def global_grad_norm(self, grads: dict, sums: dict | None = None) -> float:
        """The norm of the whole network's gradient (every shard counted
        once).  ``sums``: {node: squared norms of the layer's gradients, in
        sorted name order} when already reduced.  Collective."""
        if sums is None:
            sums = self._layer_sq_norms({n: [gs[k] for k in sorted(gs)] for n, gs in grads.items()})
        return math.sqrt(max(0.0, self.norms.total({n: float(np.sum(v)) for n, v in sums.items()})))

    def clip(self, grads: dict, sums: dict | None = None) -> tuple[dict, float]:
        """(the gradients scaled by ``coef`` = min(1, clip_norm / (total +
        1e-6)), coef): new arrays, the input is left alone; sets
        ``last_grad_norm`` to the total.  Collective."""
        total = self.global_grad_norm(grads, sums)
        self.last_grad_norm = total
        coef = min(1.0, self.clip_norm / (total + 1e-6))
        if coef == 1.0:
            return grads, coef
        return {n: {k: g * coef for k, g in gs.items()} for n, gs in grads.items()}, coef

    def _excluded(self, p) -> bool:
        return self.exclude_bias_and_norm and p.ndim == 1

    def _decay(self, p) -> float:
        return 0.0 if self._excluded(p) else self.weight_decay

    # ---- the step --------------------------------------------------------------------
    def step_nodes(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """Update ``params[node][name]`` in place from ``grads[node][name]``
        for every gradient given (this rank's shards).  Collective when
        norms are needed (every rank of the model calls it each step)."""
        lr = self.lr if lr is None else float(lr)
        self._check_attached(params)
        grads = {n: gs for n, gs in grads.items() if gs}
        sums = None
        if self.clip_norm > 0:
            # the layers' squared gradient norms serve the clipping and, scaled
            # by the factor, LARS's trust ratios
            sums = self._layer_sq_norms({n: [gs[k] for k in sorted(gs)] for n, gs in grads.items()})
            grads, coef = self.clip(grads, sums)
            sums = {n: v * (coef * coef) for n, v in sums.items()}
        self.steps += 1
        self._update(params, grads, lr, sums)

    def _update(self, params, grads, lr, grad_sums):
        """Apply one step to ``params`` (each optimiser kind defines it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its update")

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, **{k: dict(v) for k, v in self.state.items()}}


class SGD(Optimizer):
    """SGD with momentum, Nesterov momentum and weight decay (PyTorch's
    update rule, dampening 0).  Elementwise: every rank updates its own
    slice and replicas stay equal."""

    kind = "sgd"

    def __init__(self, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, clip_norm=0.0,
                 exclude_bias_and_norm=False, weight_decay_mode="auto"):
        if not 0 <= momentum < 1:
            raise OptimizerError(f"optimiser momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise OptimizerError("optimiser nesterov needs a positive momentum")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        super().__init__(lr, weight_decay, clip_norm, exclude_bias_and_norm, weight_decay_mode)

    @property
    def state_names(self):
        return ("momentum",) if self.momentum else ()

    def describe(self):
        extra = f", momentum {self.momentum:g}" + (" (Nesterov)" if self.nesterov else "")
        return super().describe() + extra

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """The elementwise update of flat {'node.param': shard} dicts (no
        clipping: that needs the layers)."""
        lr = self.lr if lr is None else float(lr)
        bufs = self.state.get("momentum")
        for key, g in grads.items():
            p = params[key]
            wd = self._decay(p)
            if wd and not self.decoupled:
                g = g + wd * p
            if self.momentum:
                buf = bufs.get(key)
                if buf is None:
                    buf = bufs[key] = g.copy()
                else:
                    buf *= self.momentum
                    buf += g
                g = g + self.momentum * buf if self.nesterov else buf
            if wd and self.decoupled:
                p *= 1.0 - lr * wd
            p -= lr * g

    def _update(self, params, grads, lr, grad_sums):
        self.step({f"{n}.{k}": params[n][k] for n, gs in grads.items() for k in gs},
                  {f"{n}.{k}": g for n, gs in grads.items() for k, g in gs.items()}, lr)


class AdamW(Optimizer):
    """AdamW (Loshchilov and Hutter), PyTorch's rule; with
    weight_decay_mode = "l2" it is Adam with L2 decay added to the gradient."""

    kind = "adamw"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, clip_norm=0.0,
                 exclude_bias_and_norm=False, weight_decay_mode="auto"):
        self.betas = _betas(betas)
        _positive("eps", eps)
        self.eps = float(eps)
        super().__init__(lr, weight_decay, clip_norm, exclude_bias_and_norm, weight_decay_mode)

    def _decoupled(self, mode):
        return mode in ("auto", "decoupled")

    @property
    def state_names(self):
        return ("exp_avg", "exp_avg_sq")

    def describe(self):
        return super().describe() + f", betas {self.betas}, eps {self.eps:g}"

    def _moments(self, key, g):
        b1, b2 = self.betas
        m, v = self.state["exp_avg"].get(key), self.state["exp_avg_sq"].get(key)
        if m is None:
            m = self.state["exp_avg"][key] = g * (1.0 - b1)
            v = self.state["exp_avg_sq"][key] = (g * g) * (1.0 - b2)
        else:
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
        return m, v

    def _update(self, params, grads, lr, grad_sums):
        b1, b2 = self.betas
        t = self.steps
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        xp = None
        for n, gs in grads.items():
            for k, g in gs.items():
                p = params[n][k]
                xp = xp or array_module(p)
                wd = self._decay(p)
                if wd and not self.decoupled:
                    g = g + wd * p
                m, v = self._moments(f"{n}.{k}", g)
                if wd and self.decoupled:
                    p *= 1.0 - lr * wd
                denom = xp.sqrt(v) / math.sqrt(bc2) + self.eps
                p -= (lr / bc1) * (m / denom)


class LARS(Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman and Ginsburg, 2017):
    each parameter's step is scaled by eta ||w|| / (||g|| + wd ||w||), the
    norms of the whole logical tensors."""

    kind = "lars"
    layerwise = True

    def __init__(self, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, clip_norm=0.0,
                 exclude_bias_and_norm=False, weight_decay_mode="auto"):
        if not 0 <= momentum < 1:
            raise OptimizerError(f"optimiser momentum must be in [0, 1), got {momentum}")
        _positive("trust_coefficient", trust_coefficient)
        if weight_decay_mode == "decoupled":
            raise OptimizerError("optimizer.kind = \"lars\" puts the weight decay inside the trust ratio "
                                 "(You et al., 2017): set optimizer.weight_decay_mode to \"auto\" or \"l2\", "
                                 "or use lamb or adamw for decoupled weight decay")
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        super().__init__(lr, weight_decay, clip_norm, exclude_bias_and_norm, weight_decay_mode)

    @property
    def state_names(self):
        return ("momentum",) if self.momentum else ()

    def describe(self):
        return super().describe() + f", momentum {self.momentum:g}, trust coefficient {self.trust_coefficient:g}"

    def trust_ratios(self, params, grads, grad_sums=None) -> dict:
        """{node: {name: trust ratio}} of this step (1 for excluded
        parameters).  Collective."""
        adapt = {n: [k for k in sorted(gs) if not self._excluded(params[n][k])] for n, gs in grads.items()}
        w_sums = self._layer_sq_norms({n: [params[n][k] for k in ks] for n, ks in adapt.items()})
        if grad_sums is None:
            g_sums = self._layer_sq_norms({n: [grads[n][k] for k in ks] for n, ks in adapt.items()})
        else:
            g_sums = {n: np.asarray([grad_sums[n][sorted(grads[n]).index(k)] for k in ks])
                      for n, ks in adapt.items()}
        out = {}
        for n, gs in grads.items():
            out[n] = {}
            for k in gs:
                if k not in adapt[n]:
                    out[n][k] = 1.0
                    continue
                i = adapt[n].index(k)
                wn, gn = math.sqrt(w_sums[n][i]), math.sqrt(g_sums[n][i])
                if wn > 0 and gn > 0:
                    out[n][k] = self.trust_coefficient * wn / (gn + self.weight_decay * wn)
                else:
                    out[n][k] = 1.0
        return out

    def _update(self, params, grads, lr, grad_sums):
        trust = self.trust_ratios(params, grads, grad_sums)
        bufs = self.state.get("momentum")
        for n, gs in grads.items():
            for k, g in gs.items():
                p = params[n][k]
                wd = self._decay(p)
                d = g + wd * p if wd else g
                step = (lr * trust[n][k]) * d
                if self.momentum:
                    key = f"{n}.{k}"
                    buf = bufs.get(key)
                    if buf is None:
                        buf = bufs[key] = step
                    else:
                        buf *= self.momentum
                        buf += step
                    step = buf
                p -= step


class LAMB(AdamW):
    """Layer-wise adaptive moments (You et al., 2019): Adam's bias-corrected
    direction plus decoupled weight decay, scaled by ||w|| / ||u||, the
    norms of the whole logical tensors."""

    kind = "lamb"
    layerwise = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, clip_norm=0.0,
                 exclude_bias_and_norm=False, weight_decay_mode="auto"):
        super().__init__(lr, betas, eps, weight_decay, clip_norm, exclude_bias_and_norm, weight_decay_mode)

    def _update(self, params, grads, lr, grad_sums):
        b1, b2 = self.betas
        t = self.steps
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        updates = {}
        for n, gs in grads.items():
            updates[n] = {}
            for k, g in gs.items():
                p = params[n][k]
                xp = array_module(p)
                wd = self._decay(p)
                if wd and not self.decoupled:
                    g = g + wd * p
                m, v = self._moments(f"{n}.{k}", g)
                u = (m / bc1) / (xp.sqrt(v / bc2) + self.eps)
                if wd and self.decoupled:
                    u = u + wd * p
                updates[n][k] = u
        adapt = {n: [k for k in sorted(us) if not self._excluded(params[n][k])] for n, us in updates.items()}
        sums = self._layer_sq_norms({n: [a for k in ks for a in (params[n][k], updates[n][k])]
                                     for n, ks in adapt.items()})
        for n, us in updates.items():
            for k, u in us.items():
                trust = 1.0
                if k in adapt[n]:
                    i = adapt[n].index(k)
                    wn, un = math.sqrt(sums[n][2 * i]), math.sqrt(sums[n][2 * i + 1])
                    if wn > 0 and un > 0:
                        trust = wn / un
                params[n][k] -= (lr * trust) * u


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise OptimizerError(f"optimiser {name} must be a positive number, got {v!r}")


def _nonneg(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise OptimizerError(f"optimiser {name} must be a non-negative number, got {v!r}")


def _betas(b):
    try:
        b1, b2 = (float(x) for x in b)
    except (TypeError, ValueError):
        raise OptimizerError(f"optimiser betas must be two numbers in [0, 1), got {b!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise OptimizerError(f"optimiser betas must be two numbers in [0, 1), got {b!r}")
    return (b1, b2)


CLASSES = {"sgd": SGD, "adamw": AdamW, "lars": LARS, "lamb": LAMB}


def make_optimizer(kind="sgd", *, lr, momentum=0.9, nesterov=False, weight_decay=0.0, betas=(0.9, 0.999),
                   eps=None, trust_coefficient=0.001, clip_norm=0.0, exclude_bias_and_norm=False,
                   weight_decay_mode="auto") -> Optimizer:
    """An optimiser of ``kind`` from the settings a job file holds
    (those that do not apply to the kind are ignored, except nesterov,
    which only sgd has)."""
    if kind not in CLASSES:
        raise OptimizerError(f"optimizer.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    common = dict(lr=lr, weight_decay=weight_decay, clip_norm=clip_norm,
                  exclude_bias_and_norm=exclude_bias_and_norm, weight_decay_mode=weight_decay_mode)
    if nesterov and kind != "sgd":
        raise OptimizerError(f"optimizer.nesterov = true applies to sgd only, not {kind}: set it to false")
    if kind == "sgd":
        return SGD(momentum=momentum, nesterov=nesterov, **common)
    if kind == "lars":
        return LARS(momentum=momentum, trust_coefficient=trust_coefficient, **common)
    extra = {} if eps is None else {"eps": eps}
    return CLASSES[kind](betas=betas, **extra, **common)
