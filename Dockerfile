# One dist_quant host: the package, torch (CPU), and iproute2 for tc shaping.
# Build: docker build -t dist-quant .   (for CPU-only torch wheels, pass
#   --build-arg PIP_EXTRA_INDEX_URL=<a CPU wheel index>)
# Used by docker-compose.yml; the entrypoint is the script `dist-quant cluster` runs.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*

ARG PIP_EXTRA_INDEX_URL=
ARG TORCH_SPEC=torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dist_quant ./dist_quant
COPY launch ./launch
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir -e .

ENV OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["/app/launch/node.sh", "run"]
