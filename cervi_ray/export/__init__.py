"""Model bundles (checkpoint folder plus config, labels, preprocessing, metrics, model card) and ONNX export."""

from cervi_ray.export.bundle import BundleResult, build_bundle, build_bundle_from_uri, verify_bundle
from cervi_ray.export.onnx_export import OnnxCheck, OnnxMismatchError, check_onnx, export_onnx

__all__ = [
    "BundleResult",
    "OnnxCheck",
    "OnnxMismatchError",
    "build_bundle",
    "build_bundle_from_uri",
    "check_onnx",
    "export_onnx",
    "verify_bundle",
]
