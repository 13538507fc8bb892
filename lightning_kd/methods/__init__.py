"""Distillation methods: ``LightningModule`` subclasses of :class:`DistillationModule`.

``list_methods()`` names them and ``get_method(name)`` resolves a name to its class.
"""

from __future__ import annotations

from lightning_kd.methods.ab import AB
from lightning_kd.methods.at import AT
from lightning_kd.methods.base import Batch, DistillationModule, LogitDistillationModule, ModelOutput
from lightning_kd.methods.cc import CC
from lightning_kd.methods.crd import CRD
from lightning_kd.methods.ctkd import CTKD
from lightning_kd.methods.datafree import DataFreeKD
from lightning_kd.methods.dist import DIST
from lightning_kd.methods.distiller import Distiller
from lightning_kd.methods.dkd import DKD
from lightning_kd.methods.dml import DML, OnlineDistillationModule
from lightning_kd.methods.fitnet import FitNet
from lightning_kd.methods.fsp import FSP
from lightning_kd.methods.ft import FT
from lightning_kd.methods.init_phase import InitPhaseDistillation
from lightning_kd.methods.kd import KD
from lightning_kd.methods.kdcl import KDCL
from lightning_kd.methods.lm import LanguageModelKD
from lightning_kd.methods.mlkd import MLKD
from lightning_kd.methods.multiteacher import MultiTeacherKD
from lightning_kd.methods.normkd import NormKD
from lightning_kd.methods.nst import NST
from lightning_kd.methods.ofd import OFD
from lightning_kd.methods.pkt import PKT
from lightning_kd.methods.projectorkd import ProjectorKD
from lightning_kd.methods.reviewkd import ReviewKD
from lightning_kd.methods.rkd import RKD
from lightning_kd.methods.rld import RLD
from lightning_kd.methods.sp import SP
from lightning_kd.methods.srd import SRD
from lightning_kd.methods.supervised import Supervised
from lightning_kd.methods.tfkd import TfKDSelf, TfKDVirtual
from lightning_kd.methods.vid import VID
from lightning_kd.models.registry import suggest

METHODS: dict[str, type[DistillationModule]] = {cls.__name__: cls for cls in (
    Supervised, KD, DKD, DIST, CTKD, NormKD, RLD, MLKD, TfKDSelf, TfKDVirtual, MultiTeacherKD, DML, KDCL,
    DataFreeKD, Distiller, FitNet, AT, SP, PKT, RKD, NST, CC, VID, FSP, AB, FT, ProjectorKD, SRD, OFD, ReviewKD, CRD,
    LanguageModelKD)}


def list_methods() -> list[str]:
    """Names of the available methods."""
    return list(METHODS)


def get_method(name: str) -> type[DistillationModule]:
    """The method class called ``name`` (case-sensitive, as listed by :func:`list_methods`)."""
    if name not in METHODS:
        lowered = {key.lower(): key for key in METHODS}
        hint = f" Did you mean {lowered[name.lower()]!r}?" if name.lower() in lowered else suggest(name, list(METHODS))
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["Batch", "DistillationModule", "LogitDistillationModule", "ModelOutput", "InitPhaseDistillation",
           "OnlineDistillationModule",
           "get_method", "list_methods",
           *METHODS]
