"""Multi-task models. Each returns ``(B, n_tasks)``: logits for classification tasks, raw
values for regression tasks, and says which of its parameters are shared and which belong
to one task (:class:`~rechub_lightning.models.multi_task._base.MultiTaskModel`)."""

from ._base import MultiTaskModel
from .aitm import AITM
from .esmm import ESMM
from .mmoe import MMOE
from .ple import PLE
from .shared_bottom import SharedBottom

__all__ = ["SharedBottom", "ESMM", "MMOE", "PLE", "AITM", "MultiTaskModel"]
