"""Tests for lightning_kd.models.hf. Nothing here touches the network: HF_HUB_OFFLINE=1 is set for every test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_kd.models.hf import (
    check_vocab,
    final_hidden_states,
    is_hf_name,
    lm_head,
    lm_vocab_size,
    load_hf_model,
    tiny_causal_lm,
    tiny_encoder,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _ids(vocab=256, batch=2, length=9):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_back_by_name(tmp_path, arch):
    model = tiny_causal_lm(vocab_size=96, hidden_size=32, layers=1, heads=2, arch=arch, seed=0).eval()
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    name = f"hf:{tmp_path}"
    assert is_hf_name(name) and not is_hf_name(str(tmp_path))
    loaded = load_hf_model(name).eval()
    ids = _ids(96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert lm_vocab_size(loaded) == 96


def test_seed_fixes_weights_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_causal_lm(hidden_size=32, layers=1, heads=2, seed=7)
    after = torch.rand(1)
    b = tiny_causal_lm(hidden_size=32, layers=1, heads=2, seed=7)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_states_and_head_give_the_logits(arch):
    model = tiny_causal_lm(vocab_size=80, hidden_size=32, layers=2, heads=4, arch=arch, seed=1).eval()
    ids = _ids(80)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, mask)
        weight, bias = lm_head(model)
        assert hidden.shape == (2, 9, 32) and weight.shape == (80, 32)
        torch.testing.assert_close(F.linear(hidden, weight, bias), model(ids, attention_mask=mask).logits)


def test_encoder_loads_and_gives_layer_features(tmp_path):
    encoder = tiny_encoder(vocab_size=50, hidden_size=32, layers=2, heads=2, seed=0).eval()
    encoder.save_pretrained(tmp_path)
    loaded = load_hf_model(f"hf:{tmp_path}", task="encoder").eval()
    ids = _ids(50)
    with torch.no_grad():
        out, ref = loaded(ids, output_hidden_states=True), encoder(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LM head"):
        lm_head(loaded)


def test_offline_hub_id_gives_the_fix():
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE=1.*Download it once.*hf:DIR"):
        load_hf_model("hf:lightning-kd-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_hf_model("hf:./not/a/model/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_hf_model(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="task="):
        load_hf_model(f"hf:{tmp_path}", task="seq2seq")


def test_check_vocab():
    student = tiny_causal_lm(vocab_size=256, hidden_size=16, layers=1, heads=2, seed=0)
    padded_teacher = tiny_causal_lm(vocab_size=320, hidden_size=16, layers=1, heads=2, seed=0)
    assert check_vocab(student, tiny_causal_lm(vocab_size=256, hidden_size=32, layers=1, heads=2)) == 256
    with pytest.raises(ValueError, match=r"student predicts 256 tokens but the teacher 320.*vocab_slice"):
        check_vocab(student, padded_teacher)
    assert check_vocab(student, padded_teacher, vocab_slice=256) == 256
    assert check_vocab(256, 320, vocab_slice=250) == 250
    with pytest.raises(ValueError, match=r"vocab_slice=300 must be in \[1, 256\]"):
        check_vocab(student, padded_teacher, vocab_slice=300)
