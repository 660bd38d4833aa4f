"""Apache Beam pipelines: export-onnx, build-db and classify."""
