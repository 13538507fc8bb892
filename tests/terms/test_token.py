"""The language-model terms against naive float64 re-computations: token divergences (dense and chunked), TAID,
TinyBERT's hidden states and MiniLM v2's attention relations."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_kd.methods.base import ModelOutput
from lightning_kd.methods.lm import LanguageModelKD, TokenBatch
from lightning_kd.terms import (AttentionRelationTerm, HiddenStateTerm, TAIDTerm, TokenKLTerm, term_from_spec)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def tiny_lm(layers=2, hidden=32, seed=0, vocab=64):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32))


def token_batch(batch=3, length=8, vocab=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt left out
    return TokenBatch(ids, labels, attention_mask=mask)


def naive_divergence(p, q, name, beta=0.5, skew=0.1):
    def kl(a, b):
        return sum(a[v] * math.log(a[v] / b[v]) for v in range(len(a)) if a[v] > 0)
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = [beta * p[v] + (1 - beta) * q[v] for v in range(len(p))]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, [skew * p[v] + (1 - skew) * q[v] for v in range(len(p))])
    if name == "skew_reverse_kl":
        return kl(q, [(1 - skew) * p[v] + skew * q[v] for v in range(len(p))])
    return 0.5 * sum(abs(p[v] - q[v]) for v in range(len(p)))


def naive_token_loss(student, teacher, batch, name, temperature=1.0, squared=False, **options):
    """Sum over positions t whose next token t + 1 is labelled and attended, divided by their number."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1] - 1):
            if batch.target[b, t + 1] == -100 or batch.attention_mask[b, t + 1] == 0:
                continue
            p = torch.softmax(teacher[b, t].double() / temperature, -1).tolist()
            q = torch.softmax(student[b, t].double() / temperature, -1).tolist()
            total += naive_divergence(p, q, name, **options)
            count += 1
    return total / count * (temperature**2 if squared else 1.0)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_token_term_is_the_naive_masked_shifted_token_mean(name):
    batch = token_batch()
    generator = torch.Generator().manual_seed(1)
    student, teacher = (torch.randn(3, 8, 64, generator=generator) * 2 for _ in range(2))
    term = TokenKLTerm(name, temperature=2.0, temperature_squared=True, beta=0.3, skew=0.2, weight=0.5)
    loss = term(batch, ModelOutput(student), ModelOutput(teacher))["kd"]
    options = {"beta": 0.3} if name == "jsd" else {"skew": 0.2} if name.startswith("skew") else {}
    expected = naive_token_loss(student, teacher, batch, name, temperature=2.0, squared=True, **options)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_token_term_on_a_hand_computed_pair():
    # two tokens; the prediction at position 0 scores token 1; teacher (0.75, 0.25), student uniform
    batch = TokenBatch(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), attention_mask=torch.ones(1, 2))
    student = torch.zeros(1, 2, 2)
    teacher = torch.log(torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
    forward = TokenKLTerm("forward_kl")(batch, ModelOutput(student), ModelOutput(teacher))["kd"]
    tvd = TokenKLTerm("tvd")(batch, ModelOutput(student), ModelOutput(teacher))["kd"]
    assert forward.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert tvd.item() == pytest.approx(0.25, abs=1e-6)


def test_token_term_rejects_an_unknown_divergence():
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        TokenKLTerm("kl")


def lm_pair(**kwargs):
    return LanguageModelKD(tiny_lm(), tiny_lm(layers=4, hidden=48, seed=1), **kwargs)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_chunked_term_equals_the_dense_term_in_value_and_gradients(name):
    batch = token_batch()
    dense = lm_pair(divergence=name, kd_weight=1.0, ce_weight=0.5)
    chunked = lm_pair(divergence=name, kd_weight=1.0, ce_weight=0.5, chunked=True, chunk_size=5)
    chunked.load_state_dict(dense.state_dict())
    values = {}
    for key, module in (("dense", dense), ("chunked", chunked)):
        module.log = lambda *args, **kwargs: None
        module.train()
        student_out, teacher_out = module._forward_pair(batch, 0)
        assert (student_out.logits is None) == (key == "chunked")  # the chunked step never forms (B, T, V) logits
        kd = module.terms["kd"](batch, student_out, teacher_out)["kd"]
        ce = module.token_cross_entropy(batch, student_out)
        (kd + ce).backward()
        values[key] = (kd.detach(), ce.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()})
    assert torch.allclose(values["dense"][0], values["chunked"][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(values["dense"][1], values["chunked"][1], rtol=1e-5, atol=1e-6)
    for name_, grad in values["dense"][2].items():
        assert torch.allclose(grad, values["chunked"][2][name_], rtol=1e-4, atol=1e-6), name_


def test_taid_target_interpolates_detached_student_and_teacher_logits():
    batch = token_batch()
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, 8, 64, generator=generator).requires_grad_(True)
    teacher = torch.randn(3, 8, 64, generator=generator)
    term = TAIDTerm(t_start=0.4)
    loss = term(batch, ModelOutput(student), ModelOutput(teacher))["kd"]
    target = 0.6 * student.detach() + 0.4 * teacher
    assert loss.item() == pytest.approx(naive_token_loss(student.detach(), target, batch, "forward_kl"), rel=1e-5)
    loss.backward()  # the gradient flows through q only: that of KL(p_t || q) with p_t fixed
    reference = student.detach().clone().requires_grad_(True)
    TokenKLTerm("forward_kl")(batch, ModelOutput(reference), ModelOutput(target))["kd"].backward()
    assert torch.allclose(student.grad, reference.grad, atol=1e-7)


def test_taid_schedule_follows_the_papers_update():
    term = TAIDTerm(t_start=0.4, t_end=1.0, alpha=0.1, momentum=0.5, total_steps=100)
    t, m, previous = 0.4, 0.0, None
    for step, loss in enumerate([2.0, 1.5, 1.4, 1.6]):
        term.update(loss, step)
        delta = 0.0 if previous is None else (previous - loss) / (previous + 1e-8)
        m = 0.5 * m + 0.5 * delta
        floor = 0.4 + 0.6 * (step + 1) / 100
        t = min(1.0, max(floor, t + 0.1 / (1 + math.exp(-m)) * (1 - t)))
        previous = loss
        assert term.t.item() == pytest.approx(t, rel=1e-6)
    linear = TAIDTerm(t_start=0.2, t_end=0.8, total_steps=10, adaptive=False)
    linear.update(0.0, 4)
    assert linear.t.item() == pytest.approx(0.2 + 0.6 * 5 / 10)


def test_hidden_state_term_is_the_projected_masked_mse():
    batch = token_batch()
    module = LanguageModelKD(tiny_lm(layers=3), tiny_lm(layers=4, hidden=48, seed=1),
                             terms={"hidden": HiddenStateTerm({0: 1, 1: 2}, weight=2.0)})
    term = module.terms["hidden"]
    assert term.student_layers == ["model.layers.0", "model.layers.1"]
    assert term.teacher_layers == ["model.layers.1", "model.layers.2"]
    student_out, teacher_out = module._forward_pair(batch, 0)
    loss = term(batch, student_out, teacher_out)["hidden"]
    with torch.no_grad():  # layer outputs from the models' own hidden-state lists (entry i + 1: layer i's output)
        student_states = module.student(input_ids=batch.input, attention_mask=batch.attention_mask,
                                        output_hidden_states=True).hidden_states
        teacher_states = module.teacher(input_ids=batch.input, attention_mask=batch.attention_mask,
                                        output_hidden_states=True).hidden_states
    total = 0.0
    for (m, n), projector in zip([(0, 1), (1, 2)], term.projectors):
        s, t = student_states[m + 1], teacher_states[n + 1]
        w, bias = projector.weight.double(), projector.bias.double()
        errors = [((s[b, i].double() @ w.T + bias - t[b, i].double()) ** 2).mean().item()
                  for b in range(3) for i in range(8) if batch.attention_mask[b, i]]
        total += sum(errors) / len(errors)
    assert loss.item() == pytest.approx(2.0 * total, rel=1e-5)


def test_hidden_state_term_default_map_is_tinyberts_uniform_map():
    module = LanguageModelKD(tiny_lm(), tiny_lm(layers=4, hidden=48, seed=1), terms={"hidden": HiddenStateTerm()})
    assert module.terms["hidden"].teacher_layers == ["model.layers.1", "model.layers.3"]
    assert [p.weight.shape for p in module.terms["hidden"].projectors] == [torch.Size([48, 32])] * 2


def naive_relations(x, heads, mask):
    """log R[b, a, i, j] over the keys j <= i that are attended, float64 loops over rows."""
    batch, length, dim = x.shape
    size = dim // heads
    out = {}
    for b in range(batch):
        for a in range(heads):
            part = x[b, :, a * size:(a + 1) * size].double()
            for i in range(length):
                keys = [j for j in range(i + 1) if mask[b, j]]
                scores = torch.stack([part[i] @ part[j] / math.sqrt(size) for j in keys])
                out[b, a, i] = dict(zip(keys, torch.log_softmax(scores, 0).tolist()))
    return out


def test_attention_relation_term_is_the_naive_relation_kl():
    batch = token_batch()
    module = LanguageModelKD(tiny_lm(), tiny_lm(layers=4, hidden=48, seed=1),
                             terms={"rel": AttentionRelationTerm(student_layer=-1, teacher_layer=2, relation_heads=4)})
    term = module.terms["rel"]
    assert term.teacher_layers == [f"model.layers.2.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    student_out, teacher_out = module._forward_pair(batch, 0)
    loss = term(batch, student_out, teacher_out)["relation"]
    with torch.no_grad():
        s_states = module.student(input_ids=batch.input, output_hidden_states=True,
                                  attention_mask=batch.attention_mask).hidden_states
        t_states = module.teacher(input_ids=batch.input, output_hidden_states=True,
                                  attention_mask=batch.attention_mask).hidden_states
    total = 0.0
    for projection in ("q_proj", "k_proj", "v_proj"):
        s_layer, t_layer = module.student.model.layers[1], module.teacher.model.layers[2]
        s = getattr(s_layer.self_attn, projection)(s_layer.input_layernorm(s_states[1])).detach()
        t = getattr(t_layer.self_attn, projection)(t_layer.input_layernorm(t_states[2])).detach()
        rs, rt = naive_relations(s, 4, batch.attention_mask), naive_relations(t, 4, batch.attention_mask)
        rows = [(b, a, i) for (b, a, i) in rs if batch.attention_mask[b, i]]
        total += sum(sum(math.exp(rt[r][j]) * (rt[r][j] - rs[r][j]) for j in rt[r]) for r in rows) / len(rows)
    assert loss.item() == pytest.approx(total, rel=1e-4)


def test_attention_relation_term_needs_heads_dividing_the_projections():
    with pytest.raises(ValueError, match="relation_heads=5"):
        module = LanguageModelKD(tiny_lm(), tiny_lm(seed=1), terms={"rel": AttentionRelationTerm(relation_heads=5)})
        module.terms["rel"](token_batch(), *module._forward_pair(token_batch(), 0))


def test_hidden_state_term_rejects_a_layer_outside_the_model():
    with pytest.raises(ValueError, match="the student has 2 decoder layers"):
        LanguageModelKD(tiny_lm(), tiny_lm(seed=1), terms={"hidden": HiddenStateTerm({5: 0})})


@pytest.mark.parametrize("make", [
    lambda: TokenKLTerm("skew_reverse_kl", temperature=2.0, skew=0.3, weight=0.7),
    lambda: TokenKLTerm("jsd", beta=0.2, chunked=True, chunk_size=4),
    lambda: TAIDTerm(t_start=0.3, alpha=1e-3, total_steps=50),
    lambda: HiddenStateTerm({0: 1, 1: 3}, weight=3.0),
    lambda: AttentionRelationTerm(student_layer=0, teacher_layer=-1, relation_heads=4),
])
def test_terms_rebuild_from_their_spec_and_read_features_by_name(make):
    term = make()
    spec = term.spec()
    module = lm_pair(terms={"term": spec})
    original = lm_pair(terms={"term": term})
    assert module.terms["term"].spec() == spec
    module.load_state_dict(original.state_dict())
    batch = token_batch()
    student_out, teacher_out = original._forward_pair(batch, 0)
    expected = original.terms["term"](batch, student_out, teacher_out)
    rebuilt = module.terms["term"](batch, student_out, teacher_out)
    assert all(torch.allclose(expected[k], rebuilt[k]) for k in expected)
    # extra features, in another order, do not change what the term reads
    shuffled_s = ModelOutput(student_out.logits, {"extra": torch.zeros(1), **dict(reversed(student_out.features.items()))})
    shuffled_t = ModelOutput(teacher_out.logits, {**dict(reversed(teacher_out.features.items())), "x": torch.ones(1)})
    again = original.terms["term"](batch, shuffled_s, shuffled_t)
    assert all(torch.allclose(expected[k], again[k]) for k in expected)


def test_hidden_state_layer_map_with_integer_keys_is_stored_with_string_keys():
    spec = HiddenStateTerm({0: 1}).spec()
    assert spec["init_args"]["layer_map"] == {"0": 1}
    assert term_from_spec(copy.deepcopy(spec)).spec() == spec
