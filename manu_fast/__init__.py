"""manu_fast: fused, kernel-backed Modality-Aware Neuron Unlearning (MANU) for multimodal LLMs."""
from .activations import ACTIVATIONS
from .ops import act_stats
from .stats import FIELDS, NeuronStats, StatsFileError

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "FIELDS", "NeuronStats", "StatsFileError", "act_stats"]
