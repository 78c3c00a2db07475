"""ONNX import and export (the ``[onnx]`` extra: ``onnx``, and ``onnxruntime`` to check exports).

* :func:`load_model` turns an ``.onnx`` file into a trainable minibasis Module whose
  convolutions, BatchNorms and linear layers are real layers at their source paths,
  so ``compress``, ``fine_tune``, ``measure.profile``, ``summary``, ``count_mults`` and
  ``fuse_batch_norm`` work on it as on a zoo model.
* :func:`save_model` writes any minibasis model (zoo, imported, compressed) as a
  standard ONNX graph: a ``BasisConv2d`` becomes two plain ``Conv`` nodes
  (:func:`runtime_form`: or the form a runtime's blocked kernels run fastest).

Nothing here is imported by ``import minibasis``.
"""
from minibasis.onnx.exporter import CHECK_TOLERANCE, check_with_onnxruntime, runtime_form, save_model, to_onnx
from minibasis.onnx.importer import SUPPORTED_OPS, OnnxModel, load_model

__all__ = ["load_model", "save_model", "to_onnx", "runtime_form", "check_with_onnxruntime", "CHECK_TOLERANCE", "OnnxModel", "SUPPORTED_OPS"]
