"""The ops composed into a whole network: a narrow ResNet-18 (torchvision's
structure: 7x7/2 stem, max pool, residual blocks with strided 1x1
projections, global average pool, fully connected) trained through
runtime/sequential.py's SequentialModel equals the same network written
with torch.nn and torch.optim.SGD, starting from the same weights, in
float64: the loss, every parameter gradient, the batch-norm running
statistics, the weights after two SGD steps (momentum, weight decay) and the
inference logits.  This exercises the channels-last layouts flowing between
ops, the residual adds (one gradient array for two inputs) and the
executor's gradient accumulation, with both kernel sets."""
from __future__ import annotations

import numpy as np
import pytest

import torch  # the oracle: a test dependency (setup.cfg [test]), never skipped

from hpcnn.backend import Backend  # noqa: E402
from hpcnn.bench.kernels import copy_weights_to_torch, resnet18_graph, torch_resnet18  # noqa: E402
from hpcnn.ops import kernel_set  # noqa: E402
from hpcnn.ops.kernel_set import kernel_state, restore_kernel_state  # noqa: E402
from hpcnn.runtime.sequential import SequentialModel  # noqa: E402
from hpcnn.runtime.sgd import SGD  # noqa: E402

TOL = 1e-10


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("impl", ["fast", "reference", "fast-threads", "compiled", "compiled-threads"])
def test_resnet18_training_steps_equal_torch(impl, monkeypatch):
    from hpcnn.ops import host_threads
    before, threads, hthreads = kernel_state(), torch.get_num_threads(), host_threads.host_threads()
    kernel_set(impl.split("-")[0])
    if impl.endswith("threads"):       # every array split over 3 host threads
        monkeypatch.setattr(host_threads, "MIN_ELEMENTS", 1)
        host_threads.set_host_threads(3)
    torch.set_num_threads(1)     # tiny tensors: threads only add overhead
    try:
        _check(batch=3, image=33, classes=7, width=8)
    finally:
        restore_kernel_state(before)
        torch.set_num_threads(threads)
        host_threads.set_host_threads(hthreads)


def _check(batch, image, classes, width):
    torch.manual_seed(0)
    g = resnet18_graph(batch, image, classes, width)
    hm = SequentialModel(g, dtype=np.float64, seed=3, backend=Backend("numpy"))
    tm = torch_resnet18(torch, classes, width).double()
    assert copy_weights_to_torch(torch, tm, hm) > 0, "parameter names do not line up"
    rng = np.random.default_rng(5)
    lr, mom, wd = 0.05, 0.9, 1e-3
    hopt = SGD(lr=lr, momentum=mom, weight_decay=wd)
    topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    tparams = dict(tm.named_parameters())
    tbufs = dict(tm.named_buffers())
    for step in range(2):
        x = rng.standard_normal((batch, 3, image, image))
        labels = rng.integers(0, classes, batch)
        loss, _ = hm.forward(x, labels, training=True, step=step)
        grads = hm.backward()
        topt.zero_grad(set_to_none=True)
        tloss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(labels))
        tloss.backward()
        assert abs(loss - tloss.item()) <= TOL * abs(tloss.item()), (loss, tloss.item())
        n_checked = 0
        for node, gs in grads.items():
            for k, gv in gs.items():
                tg = tparams[f"{node}.{k}"].grad.numpy()
                assert rel(gv, tg) <= TOL, f"step {step}: gradient of {node}.{k}: {rel(gv, tg):.3g}"
                n_checked += 1
        assert n_checked == len(tparams)
        hopt.step_nodes(hm.params, grads)
        topt.step()
        for name, p in tparams.items():
            node, k = name.rsplit(".", 1)
            assert rel(hm.params[node][k], p.detach().numpy()) <= TOL, f"step {step}: weights {name}"
        for name, b in tbufs.items():
            if name.endswith("num_batches_tracked"):
                continue
            node, k = name.rsplit(".", 1)
            assert rel(hm.buffers[node][k], b.numpy()) <= TOL, f"step {step}: buffer {name}"
    x = rng.standard_normal((batch, 3, image, image))
    tm.eval()
    with torch.no_grad():
        tlog = tm(torch.from_numpy(x)).numpy()
    assert rel(hm.predict(x), tlog) <= TOL
