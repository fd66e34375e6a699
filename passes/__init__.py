"""ONNX graph passes: how exported graphs are rewritten and checked.

One pass per file, named verb_object; THE order is ``pipeline.PIPELINE``.
"""
