"""Reference multimodal models in plain PyTorch, shared by the demo, the tests and bench/."""

from .chameleon import Chameleon, ChameleonConfig, VQConfig, VQImageTokenizer
from .decoder import Decoder, DecoderConfig
from .registry import REFERENCE_MODELS, ReferenceModel, build, example_inputs
from .vit import ViT, ViTConfig
from .vlm import VLM, VLMConfig, VLMDecode, VLMPrefill
from .whisper import AudioEncoder, TextDecoder, Whisper, WhisperConfig

__all__ = [
    "REFERENCE_MODELS",
    "AudioEncoder",
    "Chameleon",
    "ChameleonConfig",
    "Decoder",
    "DecoderConfig",
    "ReferenceModel",
    "TextDecoder",
    "VLM",
    "VLMConfig",
    "VLMDecode",
    "VLMPrefill",
    "VQConfig",
    "VQImageTokenizer",
    "ViT",
    "ViTConfig",
    "Whisper",
    "WhisperConfig",
    "build",
    "example_inputs",
]
