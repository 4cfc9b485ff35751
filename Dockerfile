# One dist_quant host: the package, torch (CPU), iproute2 for tc shaping, and a C compiler for
# the compressor kernels (built here at image build time, so containers start on the compiled
# path; a host with another CPU rebuilds its -march=native library on first use, about a
# second, with the same compiler).
# Build: docker build -t dist-quant .   (for CPU-only torch wheels, pass
#   --build-arg PIP_EXTRA_INDEX_URL=<a CPU wheel index>)
# Used by docker-compose.yml; the entrypoint is the script `dist-quant cluster` runs.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ARG PIP_EXTRA_INDEX_URL=
ARG TORCH_SPEC=torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dist_quant ./dist_quant
COPY launch ./launch
RUN pip install --no-cache-dir "$TORCH_SPEC" && pip install --no-cache-dir -e .

# the kernels' cache inside the image, filled now with the default level (DIST_QUANT_ISA=native)
ENV DIST_QUANT_CACHE=/opt/dist_quant/kernels
RUN python -c "from dist_quant.compress import fast; print(fast.build())"

ENV OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["/app/launch/node.sh", "run"]
