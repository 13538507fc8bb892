"""LanguageModelKD: training on token batches with every divergence, the frozen teacher, checkpoints, the vocabulary
guard, evaluation metrics against naive re-computations, and DDP normalisation by the global token count."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_trainer
from lightning_kd.data.text import TextDataModule
from lightning_kd.methods import LanguageModelKD, get_method
from lightning_kd.methods.lm import TokenBatch
from lightning_kd.terms import AttentionRelationTerm, HiddenStateTerm, TAIDTerm

ROOT = Path(__file__).resolve().parents[2]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def tiny_lm(layers=2, hidden=32, seed=0, vocab=256):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32))


class ByteText(L.LightningDataModule):
    """Byte-level sequences of 16 tokens from Python's own help topics: batches {input_ids, attention_mask,
    labels}."""

    num_classes = 256

    def __init__(self, batch_size=8, samples=64):
        super().__init__()
        from pydoc_data.topics import topics

        data = torch.tensor(list("".join(topics.values()).encode()[: samples * 16]), dtype=torch.long)
        self.items = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()}
                      for row in data.view(samples, 16)]
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=self.batch_size)

    val_dataloader = test_dataloader = train_dataloader


def text_data():
    return TextDataModule(seq_len=16, batch_size=8)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_each_divergence_trains_the_student_on_text(divergence):
    model = LanguageModelKD(tiny_lm(), tiny_lm(layers=3, seed=1), divergence=divergence)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, text_data())
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/loss_ce", "train/loss_kd", "val/loss", "val/bpb", "val/ppl", "val/acc",
                 "val/agreement", "val/teacher_bpb"):
        assert torch.isfinite(logged[name]), name
    assert logged["val/bpb"].item() == pytest.approx(logged["val/loss"].item() / math.log(2), rel=1e-5)
    assert logged["val/ppl"].item() == pytest.approx(math.exp(logged["val/loss"].item()), rel=1e-5)
    assert any(not torch.equal(v, model.student.state_dict()[k]) for k, v in before.items())


def test_the_registry_and_the_terms_compose():
    assert get_method("LanguageModelKD") is LanguageModelKD
    model = LanguageModelKD(tiny_lm(), tiny_lm(layers=4, seed=1), terms={
        "taid": TAIDTerm(total_steps=4), "hidden": HiddenStateTerm(weight=0.1),
        "relation": AttentionRelationTerm(relation_heads=4)})
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, text_data())
    logged = trainer.callback_metrics
    for name in ("train/loss_taid_kd", "train/loss_hidden", "train/loss_relation"):
        assert torch.isfinite(logged[name]), name
    assert 0.4 < model.terms["taid"].t.item() <= 1.0 and "train/taid_t" in logged


def test_teacher_handed_over_in_train_mode_stays_frozen_in_eval_mode():
    teacher = tiny_lm(seed=1)
    teacher.train()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model = LanguageModelKD(tiny_lm(), teacher, divergence="reverse_kl", kd_weight=1.0)
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(model, text_data())
    assert modes and not any(modes)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())


def test_checkpoint_round_trip_without_the_teacher(tmp_path):
    model = LanguageModelKD(tiny_lm(), tiny_lm(seed=1), divergence="jsd", beta=0.3, kd_weight=0.5)
    trainer = make_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, text_data())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state) and "student.lm_head.weight" in state
    teacher = tiny_lm(seed=1)
    restored = LanguageModelKD.load_from_checkpoint(tmp_path / "last.ckpt", student=tiny_lm(seed=5), teacher=teacher,
                                                    weights_only=True)
    assert restored.terms["kd"].beta == 0.3 and restored.terms["kd"].weight == 0.5
    assert all(torch.equal(v, restored.student.state_dict()[k]) for k, v in model.student.state_dict().items())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in restored.teacher.state_dict().items())


def test_models_named_by_config_rebuild_from_the_checkpoint_alone(tmp_path):
    model = LanguageModelKD(student={"vocab_size": 256, "hidden_size": 32, "layers": 2, "seed": 0},
                            teacher={"vocab_size": 256, "hidden_size": 32, "layers": 3, "seed": 1}, divergence="tvd")
    trainer = make_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, text_data())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = LanguageModelKD.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.terms["kd"].divergence == "tvd" and len(restored.teacher.model.layers) == 3
    assert all(torch.equal(v, restored.student.state_dict()[k]) for k, v in model.student.state_dict().items())
    assert all(torch.equal(v, restored.teacher.state_dict()[k]) for k, v in model.teacher.state_dict().items())


def test_composite_checkpoint_stores_term_specs(tmp_path):
    model = LanguageModelKD(tiny_lm(), tiny_lm(layers=4, seed=1), terms={"hidden": HiddenStateTerm({0: 1})})
    trainer = make_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, text_data())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    terms = torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]["terms"]
    assert terms["hidden"]["init_args"]["layer_map"] == {"0": 1}
    restored = LanguageModelKD.load_from_checkpoint(tmp_path / "last.ckpt", student=tiny_lm(seed=5),
                                                    teacher=tiny_lm(layers=4, seed=1), weights_only=True)
    assert torch.equal(restored.terms["hidden"].projectors[0].weight, model.terms["hidden"].projectors[0].weight)


def test_different_vocabularies_get_one_clear_error_and_vocab_slice_fixes_it():
    with pytest.raises(ValueError, match=r"student's vocabulary has 256 tokens but the teacher's has 320.*vocab_slice"):
        LanguageModelKD(tiny_lm(), tiny_lm(seed=1, vocab=320))
    model = LanguageModelKD(tiny_lm(), tiny_lm(seed=1, vocab=320), vocab_slice=256)
    assert model.num_classes == 256
    batch = next(iter(ByteText().train_dataloader()))
    model.log = lambda *args, **kwargs: None
    assert torch.isfinite(model.training_step(batch, 0))
    with pytest.raises(ValueError, match="num_classes=100 but the models give 256 logits"):
        LanguageModelKD(tiny_lm(), tiny_lm(seed=1), num_classes=100)


def test_teacher_is_required_unless_the_student_trains_alone():
    with pytest.raises(ValueError, match="kd_weight=0"):
        LanguageModelKD(tiny_lm())
    assert not LanguageModelKD(tiny_lm(), kd_weight=0).terms


def test_evaluation_metrics_equal_naive_token_statistics():
    model = LanguageModelKD(tiny_lm(), tiny_lm(seed=1), tokens_per_byte=0.5)
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model.eval()
    model.validation_step({"input_ids": ids, "attention_mask": mask, "labels": labels}, 0)
    model.on_validation_epoch_end()
    with torch.no_grad():
        student = model.student(input_ids=ids, attention_mask=mask).logits.double()
        teacher = model.teacher(input_ids=ids, attention_mask=mask).logits.double()
    nll, teacher_nll, correct, agree, count = 0.0, 0.0, 0, 0, 0
    for b in range(3):
        for t in range(9):
            if labels[b, t + 1] == -100 or mask[b, t + 1] == 0:
                continue
            target = int(labels[b, t + 1])
            nll -= torch.log_softmax(student[b, t], -1)[target].item()
            teacher_nll -= torch.log_softmax(teacher[b, t], -1)[target].item()
            correct += int(student[b, t].argmax()) == target
            agree += int(student[b, t].argmax()) == int(teacher[b, t].argmax())
            count += 1
    assert count == 5 + 9 + 6
    assert logged["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert logged["val/bpb"] == pytest.approx(nll / count / math.log(2) * 0.5, rel=1e-5)
    assert logged["val/teacher_bpb"] == pytest.approx(teacher_nll / count / math.log(2) * 0.5, rel=1e-5)
    assert logged["val/acc"] == pytest.approx(correct / count) and logged["val/agreement"] == pytest.approx(agree / count)


def test_training_cross_entropy_is_the_shifted_masked_token_mean():
    model = LanguageModelKD(tiny_lm(), kd_weight=0)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, :3] = -100
    batch = TokenBatch(ids, labels, attention_mask=torch.ones_like(ids))
    student_out, _ = model._forward_pair(batch, 0)
    logits = student_out.logits.detach().double()
    terms = [F.cross_entropy(logits[b, t][None], labels[b, t + 1][None]).item()
             for b in range(2) for t in range(5) if labels[b, t + 1] != -100]
    assert model.token_cross_entropy(batch, student_out).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


DDP_SCRIPT = textwrap.dedent("""
    import sys

    import torch

    sys.path[:0] = [sys.argv[2], sys.argv[3]]
    from test_lm import ddp_run

    model = ddp_run(devices=2, batch_size=4)
    torch.save(model.student.state_dict(), f"{sys.argv[1]}/rank{torch.distributed.get_rank()}.pt")
""")


def ddp_run(devices: int, batch_size: int) -> LanguageModelKD:
    """One SGD step on 8 sequences of which the first 3 keep 3 of their 15 predictions and the others all 15, so
    that the two ranks' token counts differ however the sampler splits the batch."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for index in range(8):
        ids = torch.randint(0, 256, (16,), generator=generator)
        labels = ids.clone()
        if index < 3:
            labels[1:13] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    model = LanguageModelKD(tiny_lm(), tiny_lm(seed=1), divergence="forward_kl", kd_weight=1.0, ce_weight=0.5,
                            optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(model, DataLoader(items, batch_size=batch_size))
    return model


@pytest.mark.ddp
def test_two_process_ddp_normalises_by_the_global_token_count(tmp_path):
    script = tmp_path / "lm_ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent), str(ROOT / "tests")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    single = ddp_run(devices=1, batch_size=8).student.state_dict()
    initial = tiny_lm().state_dict()
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key], value, rtol=1e-4, atol=1e-6), key
    assert any(not torch.allclose(value, initial[key]) for key, value in single.items())


def test_gradient_accumulation_normalises_by_the_token_count_of_the_whole_step():
    """Two micro-batches holding 30 and 6 valid tokens, accumulated into one step, move the student exactly as one
    step on both at once: the step's loss is the mean over all 36 tokens, not the mean of the two token means."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("".join(topics.values()).encode()[:64]), dtype=torch.long).view(4, 16)
    labels = data.clone()
    labels[2:, :13] = -100  # the second micro-batch keeps 3 predicted tokens per row
    items = [{"input_ids": data[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": labels[i]}
             for i in range(4)]

    def one_step(batch_size, accumulate):
        model = LanguageModelKD(tiny_lm(seed=1), tiny_lm(hidden=48, seed=2), kd_weight=0.5, temperature=2.0,
                                optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
        trainer = make_trainer(max_steps=1, limit_val_batches=0, accumulate_grad_batches=accumulate)
        trainer.fit(model, train_dataloaders=DataLoader(items, batch_size=batch_size))
        return model.student.state_dict()

    accumulated, whole = one_step(2, 2), one_step(4, 1)
    fresh = tiny_lm(seed=1).state_dict()
    moved = [k for k in whole if not torch.equal(whole[k], fresh[k])]
    assert moved
    for key in moved:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6)


def test_encoders_distil_their_hidden_states_without_labels():
    """TinyBERT's general stage: two BERT encoders (no LM head), the student trained on the projected hidden-state
    MSE alone; validation reports the terms' loss; the teacher never changes."""
    model = LanguageModelKD({"arch": "bert", "vocab_size": 256, "hidden_size": 32, "layers": 2, "seed": 0},
                            {"arch": "bert", "vocab_size": 256, "hidden_size": 48, "layers": 4, "seed": 1},
                            ce_weight=0.0, kd_weight=0.0,
                            terms={"hidden": HiddenStateTerm(layer_map={0: 1, 1: 3}),
                                   "relation": AttentionRelationTerm(relation_heads=4, causal=False)})
    assert model.terms["relation"].student_layers == [f"encoder.layer.1.attention.self.{p}"
                                                      for p in ("query", "key", "value")]
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = make_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(model, text_data())
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss_hidden"]) and torch.isfinite(logged["val/loss"])
    assert logged["train/loss_relation"] > 0
    assert "val/bpb" not in logged
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
    assert model.terms["hidden"].projectors[0].weight.shape == (48, 32)
    with pytest.raises(ValueError, match="no next-token cross-entropy: pass ce_weight=0"):
        bad = LanguageModelKD({"arch": "bert", "vocab_size": 256, "hidden_size": 32, "layers": 2},
                              {"arch": "bert", "vocab_size": 256, "hidden_size": 48, "layers": 4}, kd_weight=0.0,
                              terms={"hidden": HiddenStateTerm(layer_map={0: 1, 1: 3})})
        make_trainer(max_steps=1, limit_val_batches=0).fit(bad, text_data())
