"""torchtitan pieces shared by the integration tests (tests/integrations): torchtitan's MoE
config with its standard dispatcher, its EP over a gloo world, and full gradients."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

__all__ = ["plain_moe_config", "torchtitan_ep_dims", "global_grad"]


def plain_moe_config(num_experts: int, dim: int, hidden: int, top_k: int):
    """torchtitan's MoE config with the standard dispatcher (bf16 experts), softmax routing with
    normalized weights, small normal initializations (router 0.2, experts 0.1)."""
    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)

    def init(std):
        return functools.partial(torch.nn.init.normal_, std=std)

    return make_moe_config(
        num_experts=num_experts,
        router=make_router_config(dim=dim, num_experts=num_experts, gate_param_init={"weight": init(0.2)},
                                  top_k=top_k, score_func="softmax", route_norm=True),
        routed_experts=make_routed_experts_config(dim=dim, hidden_dim=hidden, num_experts=num_experts, top_k=top_k,
                                                  param_init={n: init(0.1) for n in ("w1_EFD", "w2_EDF", "w3_EFD")},
                                                  comm_backend="standard"),
    )


def global_grad(p: torch.Tensor, world: int) -> torch.Tensor:
    """A parameter's full gradient on every rank: expert weights (sharded on EP, DTensor)
    gathered, a replicated parameter summed over the ranks (what data parallelism's all-reduce
    does)."""
    from torch.distributed.tensor import DTensor, Shard

    g = p.grad
    if isinstance(g, DTensor):
        if any(isinstance(pl, Shard) for pl in g.placements):
            return g.full_tensor().float()
        g = g.to_local()
    g = g.float().clone()
    if world > 1:
        dist.all_reduce(g)
    return g


def torchtitan_ep_dims(world: int):
    """torchtitan's EP over the gloo world (``partial_dtensor`` SPMD backend, data-parallel shard
    = EP = ``world``): its ``ParallelDims`` with the mesh built, or None at world 1."""
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend

    par = ParallelismConfig(data_parallel_shard_degree=world, expert_parallel_degree=world,
                            spmd_backend="partial_dtensor")
    set_spmd_backend(par.spmd_backend)
    if world == 1:
        return None
    tt_parallel_dims.device_type = "cpu"   # torchtitan falls back to "cuda" without a GPU
    pd = ParallelDims.from_config(par, world)
    pd.build_mesh()
    return pd
