"""One PyTorch module -> one ONNX graph, as every graph of the project is exported (torch only, so
that any module can import it without a cycle: the graphs of model/onnx_graphs.py, and the feature
extractor of model/features.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 17


def export_module(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape arithmetic
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
