"""CRD: trains out of the box with sample indices, its loss is the functional loss on the hooked embeddings, the
banks change only after backward, heads are optimized/checkpointed/restored but not exported, and batches without
indices get an error that names the fix."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from conftest import make_trainer
from lightning_kd.data import DigitsDataModule, IndexedDataModule, IndexedDataset
from lightning_kd.data.indexed import dataset_targets
from lightning_kd.losses import crd_loss, kd_loss
from lightning_kd.methods import CRD, Batch, get_method


def random_data(samples: int = 12, num_classes: int = 100) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 3, 32, 32, generator=generator),
                         torch.randint(0, num_classes, (samples,), generator=generator))


def hooked(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, out: captured.append(out))
    model(x)
    handle.remove()
    return captured[0]


def test_defaults_are_the_reference_cifar100_setting():
    model = get_method("CRD")(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    hp = model.hparams
    assert (hp.ce_weight, hp.kd_weight, hp.crd_weight) == (1.0, 0.0, 0.8)
    assert (hp.embedding_dim, hp.num_negatives, hp.nce_temperature, hp.memory_momentum) == (128, 16384, 0.07, 0.5)
    assert hp.negatives == "other_class" and model.student_layers == ["pool"] and model.teacher_layers == ["pool"]
    with pytest.raises(ValueError, match="other_class, uniform"):
        CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, negatives="hard")


@pytest.mark.parametrize("wrap", [False, True], ids=["index_data", "IndexedDataModule"])
def test_trains_out_of_the_box_on_digits(wrap):
    torch.manual_seed(0)
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    digits = DigitsDataModule(batch_size=64)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, IndexedDataModule(digits) if wrap else digits)
    for loss in ("", "_ce", "_crd"):
        assert torch.isfinite(trainer.callback_metrics[f"train/loss{loss}"])
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())
    assert isinstance(digits.datasets["train"], IndexedDataset)
    assert model.hparams.num_samples == len(digits.datasets["train"]) == 1348
    assert tuple(model.hparams.input_shape) == (1, 8, 8)
    assert (model.student_head.in_features, model.teacher_head.in_features) == (16, 32)
    assert (model.nce_normalizers > 0).all()
    assert torch.equal(model.train_targets, digits.datasets["train"].dataset.tensors[1])
    changed = (model.student_memory.memory.norm(dim=1) - 1).abs() < 1e-5
    assert 64 < int(changed.sum()) <= 3 * 64, "the rows of the three batches' samples were updated"


def test_trains_resnet8x4_from_resnet32x4_and_updates_only_the_seen_rows():
    torch.manual_seed(0)
    model = CRD(student="resnet8x4", teacher="resnet32x4", num_classes=100)
    data = random_data(12)
    loader = DataLoader(IndexedDataset(data), batch_size=4)  # fixed order: samples 0..7 in two steps
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss_crd"])
    assert model.hparams.num_samples == 12 and (model.student_head.in_features, model.teacher_head.in_features) == (
        256, 256)
    assert torch.equal(model.train_targets, data.tensors[1])
    for bank in (model.student_memory, model.teacher_memory):
        unit = (bank.memory.norm(dim=1) - 1).abs() < 1e-5
        assert unit[:8].all() and not unit[8:].any()


def test_loss_is_the_functional_loss_on_the_hooked_embeddings_and_banks_change_after_backward():
    torch.manual_seed(0)
    model = CRD(student="resnet8x4", teacher="resnet32x4", num_classes=100, input_shape=(3, 32, 32), num_samples=20,
                num_negatives=7, kd_weight=0.5)
    model.train_targets.copy_(torch.arange(20) % 4)
    model.train()
    x, target, index = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 0]), torch.tensor([5, 2, 11, 16])
    batch = Batch(x, target, index)
    drawn = []
    term = model.terms["crd"]
    draw = term.contrast_index
    term.contrast_index = lambda i: drawn.append(draw(i)) or drawn[-1]
    student_out, teacher_out = model.forward_student(batch), model.forward_teacher(batch)
    banks = model.student_memory.memory.clone(), model.teacher_memory.memory.clone()
    losses = model.distillation_losses(batch, student_out, teacher_out)

    contrast_index, = drawn
    assert contrast_index.shape == (4, 8) and torch.equal(contrast_index[:, 0], index)
    assert not (model.train_targets[contrast_index[:, 1:]] == model.train_targets[index][:, None]).any()
    student = F.normalize(model.student_head(hooked(model.student, "avgpool", x).flatten(1)), dim=1)
    with torch.no_grad():
        teacher_embedding = hooked(model.teacher, "avgpool", x).flatten(1)
    teacher = F.normalize(model.teacher_head(teacher_embedding), dim=1)
    scores_s = torch.exp(torch.bmm(banks[1][contrast_index], student[:, :, None]).squeeze(2) / 0.07)
    scores_t = torch.exp(torch.bmm(banks[0][contrast_index], teacher[:, :, None]).squeeze(2) / 0.07)
    normalizers = (20 * scores_s.mean().detach(), 20 * scores_t.mean().detach())
    assert torch.allclose(model.nce_normalizers, torch.stack(normalizers), rtol=1e-4)
    expected = 0.8 * crd_loss(student, teacher, banks[0], banks[1], contrast_index, normalizers)
    assert set(losses) == {"crd", "kd"}
    assert torch.allclose(losses["crd"], expected, rtol=1e-4) and expected > 0
    assert torch.allclose(losses["kd"], 0.5 * kd_loss(student_out.logits, teacher_out.logits, 4.0))

    sum(losses.values()).backward()  # reads the banks, so they must still be unchanged
    assert all(p.grad is not None for p in [*model.student_head.parameters(), *model.teacher_head.parameters()])
    assert all(p.grad is None for p in model.teacher.parameters())
    assert torch.equal(model.student_memory.memory, banks[0]) and torch.equal(model.teacher_memory.memory, banks[1])
    model.update_memory()
    sides = ((model.student_memory, banks[0], student), (model.teacher_memory, banks[1], teacher))
    for bank, before, embedding in sides:
        row = 0.5 * before[index] + 0.5 * embedding.detach()
        assert torch.allclose(bank.memory[index], row / row.norm(dim=1, keepdim=True), atol=1e-6)
    # the constants stay fixed after the first batch
    z = model.nce_normalizers.clone()
    model.distillation_losses(batch, model.forward_student(batch), model.forward_teacher(batch))
    assert torch.equal(model.nce_normalizers, z)


def test_heads_are_optimized_checkpointed_restored_and_not_exported(digits, tmp_path):
    torch.manual_seed(0)
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, num_negatives=64)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, digits)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    heads = [*model.student_head.parameters(), *model.teacher_head.parameters()]
    assert {id(p) for p in heads} <= optimized
    assert not any(p.requires_grad for p in [*model.student_memory.parameters(), *model.teacher_memory.parameters()])
    trainer.save_checkpoint(tmp_path / "crd.ckpt")
    checkpoint = torch.load(tmp_path / "crd.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_samples"] == 1348
    assert tuple(checkpoint["hyper_parameters"]["input_shape"]) == (1, 8, 8)
    state = checkpoint["state_dict"]
    for key in ("student_memory.memory", "teacher_memory.memory", "nce_normalizers", "train_targets",
                "student_head.weight", "teacher_head.weight"):
        key = f"terms.crd.{key}"
        assert torch.equal(state[key], model.state_dict()[key]), key
    model.export_student(tmp_path / "student.pt")
    assert set(torch.load(tmp_path / "student.pt", weights_only=True)) == set(model.student.state_dict())
    restored = CRD.load_from_checkpoint(tmp_path / "crd.ckpt")
    for key, value in model.state_dict().items():
        if not key.startswith("teacher."):
            assert torch.equal(restored.state_dict()[key], value), key


def test_batches_without_indices_get_an_error_naming_the_fix():
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, index_data=False)
    trainer = make_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="IndexedDataModule"):
        trainer.fit(model, DigitsDataModule(batch_size=16))
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 2), batch_size=4)
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="IndexedDataset"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, train_dataloaders=loader)


def test_indices_outside_the_memory_are_refused():
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                num_samples=10, negatives="uniform")
    batch = Batch(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"\[0, 9\].*from 3 to 10"):
        model.distillation_losses(batch, model.forward_student(batch), model.forward_teacher(batch))


def test_memory_size_must_match_the_training_set():
    model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, num_samples=100)
    with pytest.raises(ValueError, match="1348 samples but CRD's memory banks have 100 rows"):
        make_trainer(max_steps=1, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=16))


def test_indexed_dataset_and_targets_of_the_common_data_sets():
    images, labels = torch.randn(6, 2), torch.tensor([3, 1, 4, 1, 5, 9])
    data = IndexedDataset(TensorDataset(images, labels))
    assert len(data) == 6 and data[4][2] == 4 and torch.equal(data[4][0], images[4])

    class Records(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"input": torch.zeros(2), "target": i % 2}

    assert IndexedDataset(Records())[2]["index"] == 2
    batch = next(iter(DataLoader(data, batch_size=6)))
    assert torch.equal(CRD.unpack_batch(batch).index, torch.arange(6))
    class WithTargets(Records):
        targets = [7, 8, 9]

    assert torch.equal(dataset_targets(Subset(data, [5, 0])), torch.tensor([9, 3]))
    assert torch.equal(dataset_targets(ConcatDataset([WithTargets(), Records()])), torch.tensor([7, 8, 9, 0, 1, 0]))
    class Plain(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(data)

    with pytest.raises(TypeError, match="IndexedDataset"):
        IndexedDataModule(Plain()).setup("fit")


def test_indexed_data_module_from_the_command_line(tmp_path, monkeypatch):
    from lightning_kd.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--data", "lightning_kd.data.IndexedDataModule", "--data.datamodule",
                "lightning_kd.data.DigitsDataModule", "--data.datamodule.batch_size", "32", "--model", "CRD",
                "--model.student", "cnn_tiny", "--model.teacher", "cnn_small", "--model.index_data", "false",
                "--model.num_negatives", "64", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.accelerator", "cpu", "--seed_everything", "0"])
    assert cli.datamodule.datamodule.hparams.batch_size == 32
    assert (cli.model.num_classes, cli.model.hparams.in_chans) == (10, 1)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_crd"])


def test_processes_seeded_alike_draw_different_negatives(monkeypatch):
    def draw(rank):
        monkeypatch.setattr(CRD, "global_rank", property(lambda self: rank))
        model = CRD(student="cnn_tiny", teacher="cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                    num_samples=50, num_negatives=20, negatives="uniform")
        torch.manual_seed(0)
        return model.contrast_index(torch.tensor([3, 4]))

    assert torch.equal(draw(0), draw(0)), "reproducible for a given seed and rank"
    assert not torch.equal(draw(0)[:, 1:], draw(1)[:, 1:])
