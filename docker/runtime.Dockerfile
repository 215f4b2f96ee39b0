# The module runtime image for the docker runtime: Python, onnxruntime and the edgepack
# scoring server. For machines with internet access; the tests build the same image offline
# (debootstrap + a local wheel cache) because their machines reach no public image registry.
#
#   docker build -f docker/runtime.Dockerfile -t edgepack/runtime:py311 .
#
# The agent mounts a verified module read-only at /module and runs the scoring server on it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN pip install "onnxruntime>=1.18,<2" "numpy>=1.26,<3" "uvicorn[standard]>=0.30,<1" \
        "orjson>=3.10,<4" "inference-schema>=1.8,<2" "pydantic>=2.7,<3" "cryptography>=42,<49"

WORKDIR /opt/edgepack
COPY manifests/ manifests/
COPY edge_agent/ edge_agent/
ENV PYTHONPATH=/opt/edgepack

RUN useradd --system --uid 10001 --no-create-home edgepack
USER 10001
EXPOSE 8890
ENTRYPOINT ["python", "-m", "edge_agent.scoring", "--module-dir", "/module", "--host", "0.0.0.0"]
CMD ["--port", "8890"]
