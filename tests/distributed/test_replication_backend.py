"""MoEtion's replication group is gloo whatever the training device: the rank's context builds
it so on a CUDA rank too, and its transport moves host buffers with no device staging (the
replication thread never issues NCCL work next to training's)."""

import pytest
import torch

from megatron_moetion.testing.dist import run_ranks

pytestmark = pytest.mark.distributed


def _connect_on_a_cuda_rank(rank, world):
    import torch.distributed as dist

    from megatron_moetion.testing import cpu_support

    cpu_support.install(training=False)
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import schedules

    from megatron_moetion.adapter.rank_context import RankContext
    from megatron_moetion.config import MoEtionConfig
    from megatron_moetion.transport import Parcel

    # a pipeline of `world` stages, one rank per node; the session believes it trains on CUDA
    mpu.get_pipeline_model_parallel_group = lambda: dist.group.WORLD
    mpu.get_pipeline_model_parallel_rank = lambda: rank
    schedules._build_default_pg_collection = lambda: None
    requested = []
    new_group = dist.new_group

    def spy(*args, **kwargs):
        requested.append(kwargs.get("backend"))
        return new_group(*args, **kwargs)

    dist.new_group = spy
    cfg = MoEtionConfig(enabled=True, timeout_s=30, replication_factor=1, node_id="node{rank}")
    stub = RankContext.connect(cfg, device=torch.device("cuda", 0))
    dist.new_group = new_group
    # a window-sized parcel round the ring, from host memory to host memory
    data = torch.arange(3000, dtype=torch.uint8) + rank
    got = stub.transport.exchange(send_to=stub.topology.buddies(rank)[0],
                                  parcel=Parcel(data, b"meta", (rank,)),
                                  recv_from=stub.topology.owners(rank)[0], tag=7)
    return {"requested": requested, "backend": str(dist.get_backend(stub.replication_group)),
            "ok": got.ok, "from": got.parcel.ids[0], "device": str(got.parcel.data.device),
            "bytes": bytes(got.parcel.data[:3000].numpy())}


def test_replication_group_is_gloo_on_a_cuda_rank():
    outs = run_ranks(_connect_on_a_cuda_rank, 2, timeout_s=120)
    for rank, out in enumerate(outs):
        assert out["requested"] == ["gloo", "gloo"]  # control group, replication group
        assert out["backend"] == "gloo"
        owner = 1 - rank
        assert out["ok"] and out["from"] == owner and out["device"] == "cpu"
        assert out["bytes"] == bytes((torch.arange(3000, dtype=torch.uint8) + owner).numpy())


def test_nccl_is_refused_for_moetions_own_groups(monkeypatch):
    import torch.distributed as dist

    from megatron_moetion.replication import new_group_for
    from megatron_moetion.transport import ProcessGroupTransport

    with pytest.raises(ValueError, match="gloo on every machine"):
        new_group_for(backend="nccl")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="needs a gloo process group"):
        ProcessGroupTransport(object())
