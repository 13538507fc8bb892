"""CRDTerm alone: its loss is crd_loss on its heads' embeddings of the named features, × weight; the banks take the
batch after the step."""

import torch
import torch.nn.functional as F

from lightning_kd.losses import crd_loss
from lightning_kd.methods import Distiller, ModelOutput
from lightning_kd.methods.base import Batch
from lightning_kd.terms import CRDTerm


def test_the_term_is_the_weighted_functional_loss_on_its_named_features():
    torch.manual_seed(0)
    model = Distiller("cnn_tiny", "cnn_small", num_classes=10, in_chans=1, input_shape=(1, 8, 8),
                      terms={"crd": CRDTerm(embedding_dim=6, num_negatives=3, num_samples=10, negatives="uniform",
                                            weight=0.7)})
    term = model.terms["crd"]
    (s_name,), (t_name,) = term.student_layers, term.teacher_layers
    s_feat, t_feat = torch.randn(4, 16), torch.randn(4, 32)
    # extra features in another order: the term reads its own by name
    student_out = ModelOutput(torch.randn(4, 10), {"other": torch.randn(4, 3), s_name: s_feat})
    teacher_out = ModelOutput(torch.randn(4, 10), {t_name: t_feat, "other": torch.randn(4, 5)})
    batch = Batch(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 4, 6, 9]))
    drawn = []
    draw = term.contrast_index
    term.contrast_index = lambda index: drawn.append(draw(index)) or drawn[-1]
    banks = term.student_memory.memory.clone(), term.teacher_memory.memory.clone()
    loss = term(batch, student_out, teacher_out)["crd"]
    s = F.normalize(term.student_head(s_feat), dim=1)
    t = F.normalize(term.teacher_head(t_feat), dim=1)
    expected = crd_loss(s, t, banks[0], banks[1], drawn[0], (term.nce_normalizers[0], term.nce_normalizers[1]), 0.07)
    torch.testing.assert_close(loss, 0.7 * expected)
    assert torch.equal(term.student_memory.memory, banks[0]), "the banks wait for the end of the step"
    term.on_train_batch_end()
    assert not torch.equal(term.student_memory.memory[[1, 4, 6, 9]], banks[0][[1, 4, 6, 9]])
    assert torch.equal(term.student_memory.memory[[0, 2]], banks[0][[0, 2]])
