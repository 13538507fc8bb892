"""Distillation terms: each loss of a method as a small ``nn.Module`` that declares the layers it reads, builds its
trainable parts from their shapes and returns its weighted losses by name (:class:`DistillationTerm`). Methods are
the teacher–student base plus their terms; :class:`~lightning_kd.methods.Distiller` combines any of them."""

from lightning_kd.terms.base import DistillationTerm, term_from_spec
from lightning_kd.terms.contrastive import CRDTerm
from lightning_kd.terms.datafree import DataFreeKDTerm
from lightning_kd.terms.feature import ATTerm, FitNetTerm, NSTTerm, ProjectorKDTerm, SRDTerm, VIDTerm
from lightning_kd.terms.fusion import OFDTerm, ReviewKDTerm
from lightning_kd.terms.logit import (CTKDTerm, DISTTerm, DKDTerm, KDTerm, MLKDTerm, NormKDTerm, RLDTerm,
                                      TfKDVirtualTerm)
from lightning_kd.terms.online import DMLTerm, KDCLTerm, PeerTerm
from lightning_kd.terms.relation import CCTerm, PKTTerm, RKDTerm, SPTerm
from lightning_kd.terms.staged import ABTerm, FSPTerm, FTTerm, StagedTerm
from lightning_kd.terms.token import AttentionRelationTerm, HiddenStateTerm, TAIDTerm, TokenKLTerm

__all__ = ["DistillationTerm", "term_from_spec", "ATTerm", "CRDTerm", "DKDTerm", "FitNetTerm", "KDTerm",
           "NSTTerm", "ProjectorKDTerm", "SRDTerm", "VIDTerm", "OFDTerm", "ReviewKDTerm", "CCTerm", "PKTTerm",
           "RKDTerm", "SPTerm", "CTKDTerm", "DISTTerm", "MLKDTerm", "NormKDTerm", "RLDTerm", "TfKDVirtualTerm",
           "ABTerm", "FSPTerm", "FTTerm", "StagedTerm", "DMLTerm", "KDCLTerm", "PeerTerm",
           "DataFreeKDTerm", "TokenKLTerm", "TAIDTerm", "HiddenStateTerm", "AttentionRelationTerm"]
