"""The code paths that change with the device, on the device the run names: the CPU here and in CI,
``cuda`` when tools/gpu_check.sh runs them on a GPU machine (HPCGRAFT_TEST_DEVICE=cuda).

Each test computes on the device and checks against the same computation on the CPU (the CPU is the
reference every other test checks exactly), so on the CPU these tests are sanity checks of the
comparison itself and on a GPU they check the kernels, the pinned-memory staging, the CUDA RNG state in
checkpoints, autocast and channels-last.
"""

from __future__ import annotations

import os

import h5py
import pytest
import torch
import torch.nn.functional as F

from hpcgraft.comm.exchange import PackedTensors
from hpcgraft.comm.failure import StopRequest
from hpcgraft.comm.world import init_world
from hpcgraft.config import load_config
from hpcgraft.data import build_datasets
from hpcgraft.method import grafting
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.models import create_model, list_models
from hpcgraft.storage.tree import read_tree, write_tree
from hpcgraft.training.loop import evaluate, train_one_epoch
from hpcgraft.training.peer import build_peer
from tests._util import ROOT

IMAGENET = ("resnet18", "resnet34", "resnet50")
DEVICE = torch.device(os.environ.get("HPCGRAFT_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def _device_is_there():
    if CUDA and not torch.cuda.is_available():  # asked for a GPU: its absence is a failure, not a skip
        pytest.fail("HPCGRAFT_TEST_DEVICE=cuda but torch sees no CUDA device")


def trained_like_state(name: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A model's state with per-filter scales and random BN statistics (a fresh init is too uniform to
    make the entropies differ between peers)."""
    torch.manual_seed(seed)
    state = create_model(name, num_classes).state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in state.items():
            if not t.is_floating_point():
                continue
            if k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                scale = torch.rand(t.shape[0], generator=gen) + 0.05
                t.copy_(torch.randn(t.shape, generator=gen) * scale.view(-1, *[1] * (t.dim() - 1)))
    return state


def on(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_entropies_on_the_device_equal_the_cpus(level):
    state = trained_like_state("resnet20", 10, 1)
    plan = grafting.plan_layers(state)
    want = grafting.layer_entropies(state, plan, level=level)
    got = grafting.layer_entropies(on(state, DEVICE), plan, level=level)
    assert all(g.device.type == DEVICE.type for g in got)  # computed there, not on the host
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=2e-6)


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_graft_state_on_the_device_equals_the_cpus(level):
    """The device's alphas are the CPU's up to the method's own sensitivity: alpha's slope is a c / pi
    = 64 at equal entropies, so the ~1e-6 by which float sums of the same histogram differ become
    ~1e-4 in alpha. Mixing with the device's own alphas is exact (checked against the CPU mix)."""
    a, b = trained_like_state("resnet20", 10, 2), trained_like_state("resnet20", 10, 3)
    da, db = on(a, DEVICE), on(b, DEVICE)
    plan = grafting.plan_layers(a)

    def alphas(x: dict, y: dict) -> list[torch.Tensor]:
        return grafting.layer_coefficients(grafting.layer_entropies(x, plan, level),
                                           grafting.layer_entropies(y, plan, level))

    on_device, on_cpu = alphas(da, db), alphas(a, b)
    for d, c in zip(on_device, on_cpu, strict=True):
        torch.testing.assert_close(d.cpu(), c, rtol=0, atol=2e-4 if CUDA else 0)
    got, _ = grafting.graft_state(da, db, level=level)
    mixed = {k: v.clone() for k, v in a.items()}
    keys = grafting.member_keys(plan)
    grafting.mix_([mixed[k] for k in keys], [b[k] for k in keys],
                  grafting.per_member(plan, [al.cpu() for al in on_device]))
    for key in mixed:
        assert got[key].device.type == DEVICE.type
        torch.testing.assert_close(got[key].cpu(), mixed[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_invalid_filter_counts_on_the_device_equal_the_cpus():
    state = trained_like_state("resnet20", 10, 4)
    with torch.no_grad():
        state["layers.0.conv1.weight"][:5].mul_(1e-4)  # five filters far under both thresholds
    want = grafting.count_invalid_filters(state, (0.1, 0.01))
    assert want[0.01] >= 5
    assert grafting.count_invalid_filters(on(state, DEVICE), (0.1, 0.01)) == want


@pytest.mark.process  # MPI in this process: the buffers go through a real communicator
@pytest.mark.parametrize("weighted", [False, True])
def test_packed_tensors_stage_through_host_memory_and_back(weighted):
    """The ring's buffers on the device: packed (optionally scaled, as the allreduce packs them), staged
    through pinned host memory when the tensors live on a GPU, sent to this rank itself, unpacked."""
    from mpi4py import MPI

    state = on(trained_like_state("resnet20", 10, 5), DEVICE)
    tensors = [t for t in state.values() if t.is_floating_point()]
    packed = PackedTensors(tensors, host_staging=True)
    assert packed.staging == CUDA
    if CUDA:
        assert all(b.is_pinned() for b in packed.host_send.values())
    weights = [torch.full((t.shape[0],) + (1,) * (t.dim() - 1), 0.5, device=DEVICE) if t.dim() else
               torch.tensor(0.5, device=DEVICE) for t in tensors] if weighted else None
    packed.pack(weights)
    if weighted:  # the allreduce path: every slot packed, then reduced (one rank: the sum is itself)
        packed.allreduce(MPI.COMM_SELF)
    else:
        packed.sendrecv(MPI.COMM_SELF, 0, 0)
    got = packed.received()
    for t, r in zip(tensors, got, strict=True):
        assert r.device.type == DEVICE.type
        torch.testing.assert_close(r, t * 0.5 if weighted else t, rtol=0, atol=0)


def test_distillation_on_the_device_equals_the_cpus():
    gen = torch.Generator().manual_seed(6)
    everyone = torch.randn(3, 16, 10, generator=gen)
    want = distillation_loss(everyone[1], mean_of_others(everyone, 1, 3.0), 3.0)
    d = everyone.to(DEVICE)
    got = distillation_loss(d[1], mean_of_others(d, 1, 3.0), 3.0)
    torch.testing.assert_close(got.cpu(), want, **TOL)


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_a_step_in_channels_last_and_autocast(name):
    """One SGD step of every registered model on the device, plain and with channels-last + bf16
    autocast (as ``dist.channels_last`` and ``dist.amp`` run it): finite, and the same prediction."""
    size, channels = (8, 1) if name.startswith("digits") else (64 if name in IMAGENET else 32, 3)
    torch.manual_seed(7)
    model = create_model(name, 10).to(DEVICE)
    x = torch.randn(4, channels, size, size, device=DEVICE)
    y = torch.arange(4, device=DEVICE) % 10
    model.eval()
    xc = x.contiguous(memory_format=torch.channels_last)
    # TF32 (cuDNN's default for convolutions) rounds each layer to 10 bits, differently per memory
    # format: compare the layouts in full float32.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        plain = model(x).float()
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(xc).float(), plain, rtol=1e-3, atol=1e-3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
        loss = F.cross_entropy(model(xc), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _peer(*overrides: str):
    cfg = load_config(str(ROOT / "configs/digits.yaml"),
                      [f"dist.device={DEVICE.type}", "graft.mode=none", "checkpoint.enabled=false",
                       "log.progress=off", "dist.threads=1", *overrides])
    return build_peer(cfg, init_world(1))


class FewBatches:
    """The first ``n`` batches of a loader (the loop's interface: ``epoch()`` and ``len()``)."""

    def __init__(self, loader, n: int) -> None:  # noqa: ANN001
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def epoch(self, epoch: int, start: int = 0):  # noqa: ANN201
        it = self.loader.epoch(epoch, start=start)
        return (b for _, b in zip(range(self.n - start), it, strict=False))


def _train_steps(peer, n: int) -> None:  # noqa: ANN001
    peer.train_loader = FewBatches(peer.train_loader, n)
    stop = StopRequest(peer.world.comm)
    train_one_epoch(peer, stop)
    stop.close()


@pytest.mark.process  # a peer in a world of one rank: MPI in this process
def test_training_on_the_device_tracks_the_cpu_and_batchnorm_statistics_agree():
    """Three steps of the real loop on the device and on the CPU from the same weights and batches:
    BatchNorm running statistics and weights agree to float tolerance (on the CPU: exactly), and so
    does the evaluation that follows."""
    peers = [_peer(), _peer("dist.device=cpu")]
    assert peers[0].train_loader.dataset.device.type == DEVICE.type  # batches are built on the device
    for p in peers:
        _train_steps(p, 3)
    dev, cpu = (p.model.state_dict() for p in peers)
    for key in cpu:
        tol = dict(rtol=0, atol=0) if not CUDA else dict(rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(dev[key].cpu(), cpu[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    assert peers[0].progress.step == 3 and peers[0].progress.seen == peers[1].progress.seen
    (row_dev, ens_dev), (row_cpu, ens_cpu) = (evaluate(p) for p in peers)
    assert row_dev["test_acc"] == pytest.approx(row_cpu["test_acc"], abs=0.6)  # two images of 355 may flip
    assert ens_dev == pytest.approx(row_dev["test_acc"]) and row_dev["train_loss"] > 0


def test_in_memory_batches_built_on_the_device_are_the_cpus():
    """Gather, random crop, flip and normalisation on the device: the same pixels as on the CPU (the
    random draws come from the same CPU generators)."""
    cpu_set, _ = build_datasets("digits", "", 0)
    dev_set, _ = build_datasets("digits", "", 0)
    dev_set.to(DEVICE)
    idx = torch.arange(0, 640, 5)
    for augment in (None, 11):
        gens = [torch.Generator().manual_seed(augment) if augment is not None else None for _ in range(2)]
        (xc, yc), (xd, yd) = cpu_set.get_batch(idx, gens[0]), dev_set.get_batch(idx, gens[1])
        assert xd.device.type == DEVICE.type
        torch.testing.assert_close(xd.cpu(), xc, rtol=1e-6, atol=1e-6)
        assert torch.equal(yd.cpu(), yc)


@pytest.mark.process  # a peer in a world of one rank: MPI in this process
def test_amp_and_channels_last_train_on_the_device():
    peer = _peer("dist.amp=true", "dist.channels_last=true")
    before = {k: v.clone() for k, v in peer.model.state_dict().items()}
    _train_steps(peer, 3)
    after = peer.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert peer.progress.loss_sum > 0 and peer.progress.step == 3


@pytest.mark.process  # a peer in a world of one rank: MPI in this process
def test_checkpoint_state_restores_the_device_rng(tmp_path):
    """A peer's checkpoint tree through a real HDF5 file: weights, momentum and every RNG state (the
    CUDA generator's on a GPU) come back, so a resumed run draws the same random numbers."""
    peer = _peer()
    _train_steps(peer, 2)
    tree = peer.state_dict()
    assert ("cuda" in tree["rng"]) == CUDA
    with h5py.File(tmp_path / "peer.h5", "w") as f:
        write_tree(f, tree)
    want_cpu, want_dev = torch.rand(3), torch.rand(3, device=DEVICE)
    torch.manual_seed(12345)  # move every generator away
    if CUDA:
        torch.cuda.manual_seed_all(12345)
    fresh = _peer()
    with h5py.File(tmp_path / "peer.h5", "r") as f:
        fresh.load_state_dict(read_tree(f))
    torch.testing.assert_close(torch.rand(3), want_cpu, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3, device=DEVICE), want_dev, rtol=0, atol=0)
    for key, value in peer.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[key], value, rtol=0, atol=0)
    assert vars(fresh.progress) == vars(peer.progress)
