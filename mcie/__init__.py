"""mcie: human-validated complex-instruction image editing (pipeline, review app, exports, MCIE-E1 model)."""

__version__ = "0.1.0"
