"""Tensor parallelism from Python with one process per GPU (docs/parallel.md, "From Python, one process per GPU"):
mla.Communicator from an NCCL unique id or a torch.distributed process group, and mla.Attention(...,
communicator=). The argument checks run in every build; the rest needs torch, a GPU and a CUDA build, and the
two-process test two GPUs (scripts/gpu-python.sh runs them)."""
import gc
import os
import socket
import sys

import numpy as np
import pytest

import mla
from conftest import GOLDEN_DIR, Golden, rel_error

ID = b"\0" * 128  # the size of an NCCL id; never handed to NCCL by the tests that use it


def cuda_ready():
    if "cuda" not in mla.available_devices():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not cuda_ready(), reason="needs torch, a GPU and mla built with MLA_WITH_CUDA=ON")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- every build ----


@pytest.mark.parametrize("rank, world, id_, device, message", [
    (0, 0, ID, 0, "world must be >= 1, got 0"),
    (2, 2, ID, 0, r"rank 2 is outside \[0, 2\)"),
    (-1, 2, ID, 0, r"rank -1 is outside \[0, 2\)"),
    (0, 1, ID[:127], 0, "id must be the 128 bytes of Communicator::unique_id\\(\\), got 127"),
    (0, 1, ID, -1, "device must be >= 0, got -1"),
])
def test_from_unique_id_names_a_bad_argument(rank, world, id_, device, message):
    with pytest.raises(ValueError, match=message):
        mla.Communicator.from_unique_id(id_, rank, world, device)


def test_ids_are_bytes_and_communicators_come_from_factories():
    with pytest.raises(TypeError, match="id must be the bytes"):
        mla.Communicator.from_unique_id("x" * 128, 0, 1, 0)
    with pytest.raises(TypeError, match="from_unique_id or Communicator.from_process_group"):
        mla.Communicator()
    w = mla.LayerWeights.load(GOLDEN_DIR / "v3-tiny")
    with pytest.raises(TypeError, match="communicator must be an mla.Communicator, got str"):
        mla.Attention(w, communicator="nccl")
    with pytest.raises(TypeError, match="communicator must be an mla.Communicator, got int"):
        mla.Attention.from_pretrained(GOLDEN_DIR / "v3-tiny", communicator=0)


def test_unique_id_or_the_build_says_it_has_no_nccl():
    if cuda_build():
        uid = mla.Communicator.unique_id()
        assert isinstance(uid, bytes) and len(uid) == 128
        assert mla.Communicator.unique_id() != uid
        return
    with pytest.raises(RuntimeError, match="no CUDA support and so no NCCL"):
        mla.Communicator.unique_id()
    with pytest.raises(RuntimeError, match="from_unique_id: this build of mla has no CUDA support"):
        mla.Communicator.from_unique_id(ID, 0, 1, 0)


def cuda_build():
    """Whether this build has NCCL (a CUDA build on a machine without a GPU lists no "cuda" device)."""
    try:
        mla.Communicator.unique_id()
    except RuntimeError as e:
        if "no CUDA support" in str(e):
            return False
        raise
    return True


def test_from_process_group_needs_an_initialised_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        mla.Communicator.from_process_group()


def test_from_process_group_passes_rank_0s_error_to_every_rank():
    # A build without NCCL: rank 0 cannot make the id and sends its error instead (no rank waits for an id).
    dist = pytest.importorskip("torch.distributed")
    if cuda_build():
        pytest.skip("this build has NCCL (the GPU tests cover from_process_group)")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="rank 0 of the group could not make an NCCL id: RuntimeError: "
                                               "Communicator::unique_id: this build of mla has no CUDA support"):
            mla.Communicator.from_process_group()
    finally:
        dist.destroy_process_group()


def test_from_process_group_joins_with_rank_0s_id(monkeypatch):
    # The plumbing alone (NCCL replaced): rank 0's id goes through broadcast_object_list to from_unique_id with the
    # group's rank and size, for the default group and a new one.
    dist = pytest.importorskip("torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    uid, joined = b"\x07" * 128, []
    monkeypatch.setattr(mla.Communicator, "unique_id", staticmethod(lambda: uid))
    monkeypatch.setattr(mla.Communicator, "from_unique_id",
                        classmethod(lambda cls, id, rank, world, device: joined.append((id, rank, world, device))))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mla.Communicator.from_process_group(device=3)
        mla.Communicator.from_process_group(dist.new_group([0]), device=5)
    finally:
        dist.destroy_process_group()
    assert joined == [(uid, 0, 1, 3), (uid, 0, 1, 5)]


# ---- CUDA ----


def run_layer(layer, g):
    """The golden's hidden states through `layer` in a fresh cache, prefill then two one-token decode steps:
    (out [B, T, D], cache rows [B, T, row_width])."""
    B, T, _ = g.hidden.shape
    cache = layer.make_cache(num_pages=B * (T // 16 + 2), page_size=16)
    seqs = [cache.add_sequence() for _ in range(B)]
    outs = []
    for begin, end in ((0, T - 2), (T - 2, T - 1), (T - 1, T)):
        outs.append(layer(g.hidden[:, begin:end], cache, g.positions[:, begin:end], sequences=seqs))
    return np.concatenate(outs, axis=1), np.stack([cache.read(s) for s in seqs])


@needs_cuda
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_a_world_of_one_process_equals_the_layer(backend):
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(0)
    g = Golden("v3-tiny")
    want, want_rows = run_layer(mla.Attention.from_pretrained(g.dir, device="cuda", dtype="bf16"), g)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = mla.Communicator.from_process_group()
        assert (comm.rank, comm.world, comm.device) == (0, 1, 0)
        layer = mla.Attention.from_pretrained(g.dir, device="cuda", dtype="bf16", communicator=comm)
        assert layer.communicator is comm
        assert layer.config.num_heads == g_heads(g)
        del comm
        gc.collect()  # the layer keeps its communicator alive
        out, rows = run_layer(layer, g)
        np.testing.assert_array_equal(out, want)  # an all-reduce over one rank changes nothing
        np.testing.assert_array_equal(rows, want_rows)
        # The whole layer's weights with a communicator: the layer keeps (all of) its rank's heads.
        whole = mla.Attention(mla.LayerWeights.load(g.dir), "cuda", "bf16", communicator=layer.communicator)
        np.testing.assert_array_equal(run_layer(whole, g)[0], want)
        with pytest.raises(ValueError, match="tp_world=2 conflicts with the communicator's world 1"):
            mla.Attention.from_pretrained(g.dir, device="cuda", communicator=layer.communicator, tp_world=2)
        with pytest.raises(ValueError, match="tp_rank=1 conflicts with the communicator's rank 0"):
            mla.Attention.from_pretrained(g.dir, device="cuda", communicator=layer.communicator, tp_rank=1)
        mla.Attention.from_pretrained(g.dir, device="cuda", communicator=layer.communicator, tp_rank=0, tp_world=1)
        with pytest.raises(ValueError, match="tensor parallelism .* needs device \"cuda\", got \"cpu\""):
            mla.Attention.from_pretrained(g.dir, device="cpu", communicator=layer.communicator)
    finally:
        dist.destroy_process_group()


def g_heads(g):
    return mla.Config.from_pretrained(g.dir).num_heads


@needs_cuda
def test_from_unique_id_with_one_rank():
    import torch

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    comm = mla.Communicator.from_unique_id(mla.Communicator.unique_id(), 0, 1, 0)
    assert (comm.rank, comm.world, comm.device) == (0, 1, 0)
    assert repr(comm) == "mla.Communicator(rank=0, world=1, device=0)"
    with pytest.raises(ValueError, match=f"device {torch.cuda.device_count()} does not exist"):
        mla.Communicator.from_unique_id(mla.Communicator.unique_id(), 0, 1, torch.cuda.device_count())
    # The binding's keep_alive: the C++ layer holds a reference to the communicator it points to.
    torch.cuda.set_device(0)
    impl, w = comm._impl, mla.LayerWeights.load(GOLDEN_DIR / "v3-tiny")
    before = sys.getrefcount(impl)
    layer = mla._mla.Attention(w, "cuda", "bf16", "auto", "auto", impl)
    assert sys.getrefcount(impl) == before + 1
    del layer
    gc.collect()
    assert sys.getrefcount(impl) == before


def _rank_main(rank, world, port, name, results):
    """One process of the two-process test: its slice of the layer over a communicator from the process group."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        comm = mla.Communicator.from_process_group()
        assert (comm.rank, comm.world, comm.device) == (rank, world, rank)
        layer = mla.Attention.from_pretrained(GOLDEN_DIR / name, device="cuda", dtype="bf16", communicator=comm)
        out, rows = run_layer(layer, Golden(name))
        np.savez(os.path.join(results, f"rank{rank}.npz"), out=out, rows=rows)
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_two_processes_equal_one_gpu(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (one process each), this machine has {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    name = "v3-tiny"  # 4 heads: 2 a rank
    g = Golden(name)
    want, want_rows = run_layer(mla.Attention.from_pretrained(g.dir, device="cuda", dtype="bf16"), g)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # the children inherit it
    mp.spawn(_rank_main, args=(2, free_port(), name, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert rel_error(got["out"], want) < 1e-2, rank  # bf16 outputs of two partial sums vs one
        np.testing.assert_array_equal(got["rows"], want_rows)  # the cache rows do not depend on the heads
