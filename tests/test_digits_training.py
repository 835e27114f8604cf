"""digits_cnn trained sequentially (SequentialModel + SGD with momentum)
on the digits HDF5 file reaches at least 97% test accuracy; the training
loop (hpcnn/runtime/sequential_trainer.py) gives the same result with and
without prefetch, and its evaluation pads short batches exactly."""
import numpy as np
import pytest

from hpcnn.data import HDF5Dataset
from hpcnn.data.digits import write_digits
from hpcnn.models import build_model
from hpcnn.runtime.lr_schedule import Schedule
from hpcnn.runtime.sequential import SequentialModel
from hpcnn.runtime.sequential_trainer import TrainerError, loss_and_accuracy, train_sequential
from hpcnn.runtime.sgd import SGD

BATCH = 32


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "digits.h5")


def _data(path, seed=0):
    return (HDF5Dataset(path, "train", batch_size=BATCH, seed=seed),
            HDF5Dataset(path, "test", batch_size=BATCH, shuffle=False, drop_last=False))


@pytest.mark.slow
def test_digits_cnn_reaches_97_percent(digits_file):
    train, test = _data(digits_file)
    epochs = 10
    graph = build_model("digits_cnn", batch=BATCH)
    opt = SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = Schedule("cosine", lr=0.05, total_steps=epochs * train.num_batches,
                     warmup_steps=train.num_batches // 2)
    log = []
    result = train_sequential(graph, train, epochs, opt, sched, test, seed=0, on_epoch=log.append)
    train.close(), test.close()
    assert [m.epoch for m in result.epochs] == list(range(epochs)) and log == result.epochs
    assert result.steps == epochs * train.num_batches
    assert result.epochs[-1].loss < result.epochs[0].loss / 5
    assert result.epochs[-1].lr < 0.01          # the cosine schedule was applied
    print(f"digits_cnn: test accuracy {result.test_accuracy:.4f} after {epochs} epochs, "
          f"{sum(m.seconds for m in result.epochs):.1f} s of training")
    assert result.test_accuracy >= 0.97


def test_prefetch_does_not_change_training(digits_file):
    runs = []
    for prefetch in (True, False):
        train, test = _data(digits_file, seed=4)
        g = build_model("digits_cnn", batch=BATCH)
        r = train_sequential(g, train, 1, SGD(lr=0.05, momentum=0.9), None, test, seed=2, prefetch=prefetch)
        runs.append(r)
        train.close(), test.close()
    a, b = runs
    assert a.epochs[0].loss == pytest.approx(b.epochs[0].loss, rel=1e-9)
    assert a.test_accuracy == b.test_accuracy
    for k, v in a.model.flat_params().items():
        np.testing.assert_allclose(v, b.model.flat_params()[k], rtol=1e-6, atol=1e-7)


def test_evaluation_pads_the_short_last_batch_exactly(digits_file):
    _, test = _data(digits_file)
    n = test.num_samples                          # 359 = 11 * 32 + 7
    assert n % BATCH != 0
    model = SequentialModel(build_model("digits_cnn", batch=BATCH), seed=1)
    for b in model.buffers.values():              # non-trivial running statistics
        if "running_mean" in b:
            b["running_mean"][...] = 0.1
            b["running_var"][...] = 2.0
    loss, acc = loss_and_accuracy(model, test)
    whole = SequentialModel(build_model("digits_cnn", batch=n), seed=1)
    for node in whole.params:
        for k in whole.params[node]:
            whole.params[node][k][...] = model.params[node][k]
        for k in whole.buffers[node]:
            whole.buffers[node][k][...] = model.buffers[node][k]
    x, y = test.read_rows(np.arange(n)), test.labels
    z = whole.predict(x).astype(np.float64)
    assert acc == pytest.approx(float((z.argmax(axis=1) == y).mean()))
    z -= z.max(axis=1, keepdims=True)
    want = -(z[np.arange(n), y] - np.log(np.exp(z).sum(axis=1))).mean()
    assert loss == pytest.approx(want, rel=1e-5)
    test.close()


def test_trainer_rejects_data_that_does_not_fit(digits_file):
    train, test = _data(digits_file)
    opt = SGD(lr=0.1)
    with pytest.raises(TrainerError, match="data batch size 32 differs from graph 'digits_cnn'.s batch size 16"):
        train_sequential(build_model("digits_cnn", batch=16), train, 1, opt)
    with pytest.raises(TrainerError, match=r"samples have shape \(1, 16, 16\) but graph 'lenet5' takes \(1, 32, 32\)"):
        train_sequential(build_model("lenet5", batch=BATCH), train, 1, opt)
    with pytest.raises(TrainerError, match="epochs must be a positive integer, got 0"):
        train_sequential(build_model("digits_cnn", batch=BATCH), train, 0, opt)
    dropping = HDF5Dataset(digits_file, "test", batch_size=BATCH, shuffle=False)   # drop_last=True
    with pytest.raises(TrainerError, match="would leave out its last 7 samples: open it with drop_last=False"):
        train_sequential(build_model("digits_cnn", batch=BATCH), train, 1, opt, test_dataset=dropping)
    dropping.close()
    train.close(), test.close()


def test_layerwise_optimisers_train_sequentially_with_augmentation(digits_file):
    """train_sequential attaches LARS and LAMB to its model (their norms are
    the whole tensors'); one epoch of augmented digits learns something
    (chance is 0.1)."""
    from hpcnn.data.augment import Augmentation
    from hpcnn.runtime.optimizers import make_optimizer
    for kind, lr in (("lars", 2.0), ("lamb", 0.01)):
        aug = Augmentation(size=16, random_resized_crop=True, scale=(0.8, 1.0), seed=1)
        train = HDF5Dataset(digits_file, "train", batch_size=BATCH, seed=1, transform=aug)
        test = HDF5Dataset(digits_file, "test", batch_size=BATCH, shuffle=False, drop_last=False)
        opt = make_optimizer(kind, lr=lr, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01,
                             exclude_bias_and_norm=True)
        r = train_sequential(build_model("digits_cnn", batch=BATCH), train, 1, opt, None, test, seed=0)
        train.close(), test.close()
        assert opt.norms is not None and opt.steps == train.num_batches
        assert r.test_accuracy > 0.5, (kind, r.test_accuracy)
