"""The explicit model registry: name -> (model class, config class, variants, description)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cdsr.config import from_dict
from cdsr.models.abxi import ABXI, ABXIConfig, ABXIGCAConfig
from cdsr.models.autocdsr import (
    AutoCDSRBERT4Rec,
    AutoCDSRBERT4RecConfig,
    AutoCDSRPlus,
    AutoCDSRPlusConfig,
    AutoCDSRSASRec,
    AutoCDSRSASRecConfig,
)
from cdsr.models.base import SeqRecModel, Vocab
from cdsr.models.bert4rec import BERT4Rec, BERT4RecConfig
from cdsr.models.dpg import DPGConfig, DPGDiff
from cdsr.models.gca import DualStream, DualStreamConfig, GCAConfig
from cdsr.models.hstu import HSTU, HSTUConfig
from cdsr.models.hstu_cd import HSTUCD, HSTUCDConfig
from cdsr.models.sasrec import SASRec, SASRecConfig


@dataclass(frozen=True)
class ModelSpec:
    cls: type[SeqRecModel]
    config: type
    variants: tuple[str, ...]
    description: str


MODELS: dict[str, ModelSpec] = {
    "sasrec": ModelSpec(SASRec, SASRecConfig, ("merged", "single"),
                        "SASRec (Kang & McAuley 2018): causal self-attention, softmax over the target domain"),
    "bert4rec": ModelSpec(BERT4Rec, BERT4RecConfig, ("merged", "single"),
                          "BERT4Rec (Sun et al. 2019): bidirectional Cloze training, [MASK] scoring"),
    "hstu": ModelSpec(HSTU, HSTUConfig, ("merged", "single"),
                      "HSTU (Zhai et al. 2024): pointwise SiLU attention, rel. position + time bias, sampled softmax"),
    "hstu_cd": ModelSpec(HSTUCD, HSTUCDConfig, ("merged",),
                         "HSTU-CD (seed 001): intra-domain attention (block-sparse), TAPE, DDSR; switch each off for the ablation"),
    "dual_stream": ModelSpec(DualStream, DualStreamConfig, ("merged",),
                             "Dual-stream host: merged + per-domain causal encoders, shared item embeddings (param_match: sized baseline)"),
    "gca": ModelSpec(DualStream, GCAConfig, ("merged",),
                     "Gated Cross-Attention (seeds 002/003) on the dual-stream host: X_a + g(alpha) CA(LN(X_a), X_b), time-causal; logs |cos(X, X')|"),
    "dpg": ModelSpec(DPGDiff, DPGConfig, ("merged",),
                     "DPG-Diff (seed 004): disentangled per-domain guidance, guided x0-diffusion denoiser, tri-view InfoNCE"),
    "autocdsr_sasrec": ModelSpec(AutoCDSRSASRec, AutoCDSRSASRecConfig, ("merged",),
                                 "AutoCDSR (KDD 2025) on SASRec: cross-domain attention mass, Pareto (MGDA) step"),
    "autocdsr_bert4rec": ModelSpec(AutoCDSRBERT4Rec, AutoCDSRBERT4RecConfig, ("merged",),
                                   "AutoCDSR (KDD 2025) on BERT4Rec: cross-domain attention mass, Pareto (MGDA) step"),
    "abxi": ModelSpec(ABXI, ABXIConfig, ("merged",),
                      "ABXI (WWW 2025): shared encoder with per-stream dLoRA, invariant projector + iLoRA, task-guided alignment"),
    "abxi_gca": ModelSpec(ABXI, ABXIGCAConfig, ("merged",),
                          "GCA over ABXI (seeds 002/003's host): ABXI's domain streams refined by gated cross-attention; logs |cos(X, X')|"),
    "autocdsr_plus": ModelSpec(AutoCDSRPlus, AutoCDSRPlusConfig, ("merged",),
                               "AutoCDSR+ (KDD 2025) on BERT4Rec: per-domain IB tokens carry all cross-domain attention"),
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}'; registered: {sorted(MODELS)}")
    return MODELS[name]


def model_config(name: str, section: dict[str, Any] | None, variant: str) -> Any:
    """The model's config dataclass from its params.yaml section; the single-domain variant has
    no domain embedding (it only ever sees one domain)."""
    spec = get_spec(name)
    if variant not in spec.variants:
        raise ValueError(f"model '{name}' has variants {list(spec.variants)}, not '{variant}'")
    cfg = from_dict(spec.config, section or {}, f"models.{name}")
    if variant == "single" and "use_domain_emb" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, use_domain_emb=False)
    return cfg


def build_model(name: str, cfg: Any, vocab: Vocab) -> SeqRecModel:
    return get_spec(name).cls(cfg, vocab)
