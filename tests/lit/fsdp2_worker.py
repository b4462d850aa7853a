"""Worker for ``test_fsdp2.py``: the implicit-PRM loss and gradients under FSDP2 vs one process.

Run with ``torchrun --nproc_per_node 2 tests/lit/fsdp2_worker.py OUT.json`` (CPU, gloo). Every rank builds
the same seeded model and batch, computes the single-process loss and gradients on an unsharded copy, then
shards the policy and the reference with ``fully_shard`` (each decoder layer, each ``lm_head``, each model)
and trains on its half of the batch. Rank 0 writes the comparison to ``OUT.json``.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from agentrm.data.collate import collate_trajectories
from agentrm.data.tokenize import tokenize_trajectory
from agentrm.models.backbone import build_backbone
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.paths import load_tokenizer
from tests.conftest import make_trajectory
from tests.lit.conftest import TINY_BACKBONE


def outcome_loss(prm: ImplicitPRM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = prm.outcome_logits(prm.step_rewards(batch), batch["step_mask"])
    return F.binary_cross_entropy_with_logits(logits, batch["success"])


def shard(model: torch.nn.Module, mesh) -> None:
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.lm_head, mesh=mesh)  # its own unit: whole only inside its forward
    fully_shard(model, mesh=mesh)


def local_bytes(model: torch.nn.Module) -> int:
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters()
    )


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    tok = load_tokenizer("agentrm/assets/tiny_tokenizer")
    torch.manual_seed(0)
    policy = build_backbone(config=TINY_BACKBONE, vocab_size=len(tok), causal_lm=True, attn_implementation="sdpa")
    prm = ImplicitPRM(policy, beta=0.5)
    with torch.no_grad():  # the policy differs from its reference
        for p in prm.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trajs = [make_trajectory(f"t{i}", n, success=i % 2 == 0) for i, n in enumerate([3, 1, 2, 4])]
    batch = collate_trajectories([tokenize_trajectory(tok, t) for t in trajs], tok.pad_token_id)

    single = copy.deepcopy(prm)
    single_loss = outcome_loss(single, batch)
    single_loss.backward()
    ref_bytes_replicated = local_bytes(single.reference)

    shard(prm.policy, mesh)
    shard(prm.reference, mesh)
    ref_bytes_sharded = local_bytes(prm.reference)  # at rest (a root keeps its own group whole after forward)
    head_w = prm.policy.lm_head.weight
    sharded_outside_forward = isinstance(head_w, DTensor) and head_w.to_local().shape[0] < head_w.shape[0]

    half = batch["input_ids"].shape[0] // world
    mine = {k: v[rank * half : (rank + 1) * half] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    loss = outcome_loss(prm, mine)
    loss.backward()  # FSDP2 reduce-scatters the mean gradient over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world

    grad_diff = {}
    for name, p in prm.policy.named_parameters():
        full = p.grad.full_tensor()
        grad_diff[name] = float((full - dict(single.policy.named_parameters())[name].grad).abs().max())
    if rank == 0:
        result = {
            "single_loss": float(single_loss),
            "fsdp2_loss": float(mean_loss),
            "lm_head_sharded_outside_forward": sharded_outside_forward,
            "max_grad_diff": max(grad_diff.values()),
            "worst_param": max(grad_diff, key=grad_diff.get),
            "lm_head_grad_norm": float(single.policy.lm_head.weight.grad.norm()),
            "reference_bytes_replicated": ref_bytes_replicated,
            "reference_bytes_per_rank": ref_bytes_sharded,
            "reference_bytes_per_rank_after_step": local_bytes(prm.reference),
        }
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
