import numpy as np
import pytest
import torch

from hpcgraft.data import BatchLoader, DataError, build_datasets
from hpcgraft.data.digits import digits_arrays


def test_digits_split_is_fixed_and_stratified():
    train, test = build_datasets("digits")
    train2, test2 = build_datasets("digits")
    assert len(train) + len(test) == 1797
    assert torch.equal(test.labels, test2.labels) and torch.equal(train.images, train2.images)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 37


def test_the_packaged_digits_are_scikit_learns():
    """digits.npz is load_digits() unchanged: pixel counts 0-16 as uint8, the labels in the same order."""
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = digits_arrays()
    ref = datasets.load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8) and images.max() == 16
    assert np.array_equal(images, ref.images) and np.array_equal(labels, ref.target)


def test_epoch_order_is_seeded_per_stream_and_resumable():
    train, _ = build_datasets("digits")
    a = BatchLoader(train, 64, shuffle=True, seed=3, stream=0, augment=True)
    b = BatchLoader(train, 64, shuffle=True, seed=3, stream=1, augment=True)
    first = list(a.epoch(2))
    again = list(a.epoch(2))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    assert not torch.equal(first[0][1], next(b.epoch(2))[1])  # another peer, another order
    assert not torch.equal(first[0][1], next(a.epoch(3))[1])  # another epoch, another order
    resumed = list(a.epoch(2, start=5))  # mid-epoch resume sees exactly the remaining batches
    assert len(resumed) == len(first) - 5
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first[5:], resumed, strict=True))


def test_replicas_take_disjoint_slices_of_the_peer_batch():
    train, test = build_datasets("digits")
    whole = BatchLoader(train, 64, shuffle=True, seed=1, augment=False)
    parts = [BatchLoader(train, 64, shuffle=True, seed=1, replica=r, replicas=2, augment=False) for r in range(2)]
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole.epoch(0), parts[0].epoch(0), parts[1].epoch(0), strict=True):
        assert torch.equal(torch.cat([y0, y1]), yw) and torch.equal(torch.cat([x0, x1]), xw)
    shards = [BatchLoader(test, 100, shuffle=False, replica=r, replicas=2) for r in range(2)]
    seen = sum(len(y) for s in shards for _, y in s.epoch(0))
    assert seen == len(test)


@pytest.mark.process  # DataLoader worker processes
def test_workers_give_the_same_batches():
    train, _ = build_datasets("digits")
    a = BatchLoader(train, 128, shuffle=True, seed=5, augment=True)
    b = BatchLoader(train, 128, shuffle=True, seed=5, augment=True, workers=2)
    for (x1, y1), (x2, y2) in zip(a.epoch(1), b.epoch(1), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_unknown_data_set_is_a_clear_error():
    try:
        build_datasets("mnist")
    except DataError as exc:
        assert "data.name='mnist' is not known" in str(exc)
    else:
        raise AssertionError("no error")


def test_cultivating_peers_draw_identical_batches():
    """Built as the ranks build them (build_peer, a world of 2 peers seen from each peer): the same images
    while distilling, each peer its own order otherwise; the networks start different either way."""
    from hpcgraft.comm.world import World
    from hpcgraft.config import load_config
    from hpcgraft.training.peer import build_peer
    from tests.fakes import SoloComm

    self_ = SoloComm()
    for lam, same in ((1, True), (0, False)):
        cfg = load_config(None, [f"cultivate.lambda={lam}", "graft.mode=none", "dist.threads=1"])
        seen = []
        for p in (0, 1):
            world = World(comm=self_, rank=p, size=2, local_rank=p, local_size=2, peer=p, peers=2, replica=0,
                          replicas=1, graft_comm=self_, peer_comm=self_)
            peer = build_peer(cfg, world)
            x, y = next(iter(peer.train_loader.epoch(0)))
            seen.append((x, y, next(peer.model.parameters()).detach().clone()))
        (x0, y0, w0), (x1, y1, w1) = seen
        assert (torch.equal(x0, x1) and torch.equal(y0, y1)) is same, lam
        assert not torch.equal(w0, w1)


def test_digits32_is_the_digits_split_grown_to_a_cifar_input():
    train8, test8 = build_datasets("digits")
    train, test = build_datasets("digits32")
    assert train.input_shape == test.input_shape == (3, 32, 32)
    assert torch.equal(train.labels, train8.labels) and torch.equal(test.labels, test8.labels)
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey, repeated over the channels
    # a black 8x8 pixel stays black and a white one white in its 4x4 block's centre
    corner = train8.images[:, 0, 0, 0] == 0
    assert (train.images[corner, :, 1, 1] == 0).all()
    x, y = train.get_batch(torch.arange(4), None)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == train8.labels[:4].tolist()
