# The worker image for Dataflow (--sdk_container_image) and other container runners: Beam's Python SDK image, whose
# entry point (/opt/apache/beam/boot) is what Dataflow starts, plus raee-ops with ONNX Runtime and both filesystems.
#
#   docker build --build-arg BEAM=<the launching environment's apache_beam.__version__> -t IMAGE .   (as below)
#   docker build -t IMAGE .                    # CPU: onnxruntime
#   docker build --build-arg ORT=gpu -t IMAGE . # GPU: onnxruntime-gpu with its CUDA/cuDNN wheels (run on GPU workers
#                                              # with --raee_provider cuda; not tried yet)
#
# Python and Beam versions must match the launching environment's (Beam refuses a mismatched SDK).
ARG PYTHON=3.11
ARG BEAM=2.77.0
FROM apache/beam_python${PYTHON}_sdk:${BEAM}

ARG ORT=cpu
WORKDIR /opt/raee-ops
COPY pyproject.toml README.md ./
COPY raee_ops raee_ops
COPY pipelines pipelines
COPY onnx_export onnx_export
COPY schemas schemas
# No torch or transformers: workers run exported segments only (the export extra stays on the exporting machine).
RUN if [ "$ORT" = gpu ]; then ort="gpu"; extra="onnxruntime-gpu[cuda,cudnn]"; else ort="cpu"; extra=""; fi \
 && pip install --no-cache-dir ".[${ort},gcp,aws]" $extra \
 && python -c "import onnxruntime, raee_ops.pipelines.inference; print(onnxruntime.get_available_providers())"

# Where workers cache fetched artifacts (one copy per machine, checked against the manifest once per process).
ENV RAEE_CACHE_DIR=/var/cache/raee
