"""KD under DDP: two CPU processes (gloo) on halves of each batch equal one process on the whole batch."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lightning_kd.methods import KD

    out, devices = sys.argv[1], int(sys.argv[2])
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 1, 8, 8, generator=generator), torch.randint(0, 10, (64,), generator=generator)


    class Losses(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.values.append(loss.detach().clone())


    torch.manual_seed(0)
    # a student without BatchNorm (whose batch statistics would differ per process; SyncBatchNorm needs GPUs);
    # the teacher's BatchNorm is in eval mode, with the same running statistics in both processes
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 8 * 8, 10))
    model = KD(student=student, teacher="cnn_small", num_classes=10, in_chans=1)
    losses = Losses()


    class Data(L.LightningDataModule):
        # the global batch is 32 either way: rank r of 2 gets the samples r, r + 2, ... of each 32, in order

        def train_dataloader(self):
            dataset, world = TensorDataset(images, labels), self.trainer.world_size
            sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
            return DataLoader(dataset, batch_size=32 // world, sampler=sampler)

    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        deterministic=True, callbacks=[losses], use_distributed_sampler=False)
    trainer.fit(model, Data())
    torch.save({"weights": model.student.state_dict(), "losses": torch.stack(losses.values)},
               f"{out}/kd_{devices}_rank{trainer.global_rank}.pt")
""")


@pytest.mark.ddp
def test_two_process_kd_equals_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "kd_ddp.py"
    script.write_text(SCRIPT)
    for devices in (1, 2):
        result = subprocess.run([sys.executable, str(script), str(tmp_path), str(devices)], capture_output=True,
                                text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "kd_1_rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"kd_2_rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert len(single["losses"]) == 4 and all(len(r["losses"]) == 4 for r in ranks), "2 epochs of 2 steps"
    # each process's loss is the mean over its half; the global batch's loss is the mean of the two halves
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ranks[0]["losses"], ranks[1]["losses"]), "the processes saw different samples"
    for key, value in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), f"{key} differs between processes"
        torch.testing.assert_close(ranks[0]["weights"][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
