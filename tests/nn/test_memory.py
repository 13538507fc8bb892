"""The memory bank's update against a row-by-row reference, the draw of negatives, and the update under DDP (two
gloo processes) against one process updating with the whole batch."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_kd.nn import MemoryBank, gather_across_processes, sample_negatives

ROOT = Path(__file__).resolve().parents[2]


def naive_update(memory: torch.Tensor, embeddings: torch.Tensor, index: torch.Tensor, momentum: float) -> torch.Tensor:
    """One sample at a time, as the reference's update on a batch without repeated samples."""
    memory = memory.clone()
    for vector, i in zip(embeddings, index.tolist()):
        row = momentum * memory[i] + (1 - momentum) * vector
        memory[i] = row / row.norm()
    return memory


def test_initial_rows_are_uniform_in_the_references_range():
    torch.manual_seed(0)
    bank = MemoryBank(num_samples=2000, dim=12)
    bound = 1 / (12 / 3) ** 0.5
    assert bank.memory.shape == (2000, 12) and bank.memory.abs().max() <= bound
    assert bank.memory.min() < -0.9 * bound and bank.memory.max() > 0.9 * bound
    assert abs(bank.memory.pow(2).sum(1).mean().item() - 1) < 0.05, "rows of expected unit norm"
    assert [name for name, _ in bank.named_buffers()] == ["memory"] and not list(bank.parameters())


@pytest.mark.parametrize("momentum", [0.5, 0.9])
def test_update_blends_renormalises_and_leaves_other_rows(momentum):
    torch.manual_seed(0)
    bank = MemoryBank(num_samples=10, dim=5, momentum=momentum)
    before = bank.memory.clone()
    embeddings, index = torch.randn(4, 5), torch.tensor([7, 2, 0, 9])
    bank.update(embeddings, index)
    expected = naive_update(before, embeddings, index, momentum)
    assert torch.allclose(bank.memory, expected, atol=1e-6)
    assert torch.allclose(bank.memory[index].norm(dim=1), torch.ones(4))
    untouched = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(bank.memory[untouched], before[untouched])


def test_a_repeated_sample_takes_its_last_embedding():
    torch.manual_seed(0)
    bank = MemoryBank(num_samples=6, dim=3)
    before = bank.memory.clone()
    embeddings = torch.randn(4, 3)
    bank.update(embeddings, torch.tensor([4, 1, 4, 4]))
    expected = naive_update(before, embeddings[[1, 3]], torch.tensor([1, 4]), 0.5)
    assert torch.allclose(bank.memory, expected, atol=1e-6)


def test_update_takes_no_gradient_and_checks_shapes():
    bank = MemoryBank(num_samples=6, dim=3)
    embeddings = torch.randn(2, 3, requires_grad=True)
    bank.update(embeddings * 2, torch.tensor([0, 1]))
    assert not bank.memory.requires_grad
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        bank.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(num_samples=6, dim=3, momentum=1.0)


def test_gather_is_the_identity_on_one_process():
    x = torch.randn(3, 2)
    assert gather_across_processes(x) is x


def test_uniform_negatives_are_any_sample_but_the_anchor():
    torch.manual_seed(0)
    index = torch.tensor([0, 5, 9])
    negatives = sample_negatives(index, num_negatives=4000, num_samples=10)
    assert negatives.shape == (3, 4000) and negatives.dtype == torch.long
    for anchor, row in zip(index.tolist(), negatives):
        counts = torch.bincount(row, minlength=10)
        assert counts[anchor] == 0
        others = counts[[i for i in range(10) if i != anchor]].float()
        assert others.min() > 0.8 * 4000 / 9 and others.max() < 1.2 * 4000 / 9


def test_other_class_negatives_avoid_the_anchors_class():
    torch.manual_seed(0)
    targets = torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 1])
    index = torch.tensor([0, 1, 2, 11])
    negatives = sample_negatives(index, num_negatives=3000, num_samples=12, targets=targets)
    for anchor, row in zip(index.tolist(), negatives):
        assert not (targets[row] == targets[anchor]).any()
        pool = (targets != targets[anchor]).nonzero().squeeze(1)
        counts = torch.bincount(row, minlength=12)[pool].float()
        assert counts.min() > 0.8 * 3000 / len(pool) and counts.max() < 1.2 * 3000 / len(pool)


def test_negatives_are_distinct_when_the_pool_is_large_enough():
    torch.manual_seed(0)
    targets = torch.arange(30) % 3  # 20 samples of the other classes per anchor
    index = torch.tensor([0, 1, 2, 3])
    negatives = sample_negatives(index, num_negatives=20, num_samples=30, targets=targets)
    for anchor, row in zip(index.tolist(), negatives):
        assert sorted(row.tolist()) == [i for i in range(30) if targets[i] != targets[anchor]]
    negatives = sample_negatives(index, num_negatives=29, num_samples=30)
    assert all(sorted(row.tolist()) == [i for i in range(30) if i != a] for a, row in zip(index.tolist(), negatives))
    repeated = sample_negatives(index, num_negatives=21, num_samples=30, targets=targets)
    assert all(len(row.unique()) < 21 for row in repeated), "more negatives than the pool: with replacement"
    assert not any((targets[row] == targets[a]).any() for a, row in zip(index.tolist(), repeated))


def test_unbalanced_classes_mix_both_draws():
    torch.manual_seed(0)
    targets = torch.tensor([0] * 8 + [1] * 2)  # class 0 anchors have 2 negatives, class 1 anchors 8
    negatives = sample_negatives(torch.tensor([0, 9]), num_negatives=5, num_samples=10, targets=targets)
    assert set(negatives[0].tolist()) <= {8, 9}
    assert len(negatives[1].unique()) == 5 and set(negatives[1].tolist()) <= set(range(8))


DDP_SCRIPT = textwrap.dedent("""
    import sys

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from lightning_kd.nn import MemoryBank, gather_across_processes


    def batch():
        embeddings = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
        index = torch.tensor([5, 1, 9, 5, 0, 3, 1])  # repeated within and across the shards
        return embeddings, index


    def bank():
        torch.manual_seed(1)
        return MemoryBank(num_samples=12, dim=16)


    def worker(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        embeddings, index = batch()
        shard = slice(0, 3) if rank == 0 else slice(3, 7)  # uneven shards
        memory = bank()
        memory.update(embeddings[shard], index[shard])
        gathered = gather_across_processes(embeddings[shard])
        torch.save({"memory": memory.memory, "gathered": gathered}, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_two_processes_update_their_banks_like_one_process_with_the_whole_batch(tmp_path):
    script = tmp_path / "bank_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(free_port()), str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    embeddings = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([5, 1, 9, 5, 0, 3, 1])
    torch.manual_seed(1)
    single = MemoryBank(num_samples=12, dim=16)
    initial = single.memory.clone()
    single.update(embeddings, index)
    for rank in ranks:
        assert torch.equal(rank["gathered"], embeddings)
        assert torch.equal(rank["memory"], single.memory)
    assert not torch.equal(single.memory, initial)
    # each repeated sample took its last embedding over both processes: 5 from rank 1, 1 from rank 1
    expected = naive_update(initial, embeddings[[4, 5, 6, 2, 3]], torch.tensor([0, 3, 1, 9, 5]), 0.5)
    assert torch.allclose(single.memory, expected, atol=1e-6)
