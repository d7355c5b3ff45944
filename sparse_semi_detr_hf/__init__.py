"""Sparse Semi-DETR for Hugging Face Transformers.

Importing the package registers the model with the Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForObjectDetection``, ``AutoImageProcessor``) and marks the classes for remote code, so
``save_pretrained`` writes ``auto_map`` and the model-side source files next to the weights.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .configuration_sparse_semi_detr import SparseSemiDetrConfig
from .image_processing_sparse_semi_detr import SparseSemiDetrImageProcessor, SparseSemiDetrImageProcessorPil
from .modeling_sparse_semi_detr import (
    SparseSemiDetrForObjectDetection,
    SparseSemiDetrModel,
    SparseSemiDetrPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(SparseSemiDetrConfig.model_type, SparseSemiDetrConfig, exist_ok=True)
AutoModel.register(SparseSemiDetrConfig, SparseSemiDetrModel, exist_ok=True)
AutoModelForObjectDetection.register(SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, exist_ok=True)
try:  # transformers >= 5.x with per-backend processor classes
    AutoImageProcessor.register(
        SparseSemiDetrConfig,
        image_processor_classes={"torchvision": SparseSemiDetrImageProcessor, "pil": SparseSemiDetrImageProcessorPil},
        exist_ok=True,
    )
except TypeError:  # older signature
    AutoImageProcessor.register(SparseSemiDetrConfig, SparseSemiDetrImageProcessor, exist_ok=True)

SparseSemiDetrConfig.register_for_auto_class()
SparseSemiDetrModel.register_for_auto_class("AutoModel")
SparseSemiDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
SparseSemiDetrImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "SparseSemiDetrConfig",
    "SparseSemiDetrForObjectDetection",
    "SparseSemiDetrImageProcessor",
    "SparseSemiDetrImageProcessorPil",
    "SparseSemiDetrModel",
    "SparseSemiDetrPreTrainedModel",
]
