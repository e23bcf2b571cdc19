# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Self-supervised pre-training of the QT-UNet encoder (reconstruction + rotation + BYOL) on MONAI's
Ignite engines, and ImageNet Swin initialisation."""

from .model import QTUNetEncoder, QTUNetSSL, byol_momentum, collapse_signal, ssl_loss
from .views import TwoViewsd, rotate_axial
from .workflow import CollapseMonitor, EncoderSaver, SSLEvaluator, SSLTrainer, loss_jump, split_validation

__all__ = ["QTUNetEncoder", "QTUNetSSL", "byol_momentum", "collapse_signal", "ssl_loss", "TwoViewsd", "rotate_axial",
           "CollapseMonitor", "EncoderSaver", "SSLTrainer", "SSLEvaluator", "loss_jump", "split_validation"]
