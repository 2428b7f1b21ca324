"""Distillation: FISHER-LD and the baselines it is compared with, behind one trainer.

    from compressor.distill import DistillConfig, distill
    result = distill(teacher, student, data, DistillConfig(method="fisher_ld"), "runs/distill")
"""

from compressor.distill.config import DISTILL_TRAIN, DistillConfig
from compressor.distill.fisher_weights import LayerWeights, mapped_weights, read_fisher_scores
from compressor.distill.losses import LOSSES, DistillLoss, get_loss
from compressor.distill.mapping import Adapters, resolve_layer_map, uniform_map, validate_map
from compressor.distill.step import Distiller
from compressor.distill.trainer import DistillResult, check_compatible, distill, distill_dirs

__all__ = [
    "DISTILL_TRAIN", "DistillConfig", "LayerWeights", "mapped_weights",
    "read_fisher_scores", "LOSSES", "DistillLoss", "get_loss", "Adapters",
    "resolve_layer_map", "uniform_map", "validate_map", "Distiller", "DistillResult",
    "check_compatible", "distill", "distill_dirs",
]
