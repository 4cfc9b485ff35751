# One dist_quant host: the package, torch (CPU), iproute2 for tc shaping, and a C compiler for
# the compressor kernels (built here at image build time, so containers start on the compiled
# path; a host with another CPU rebuilds its -march=native library on first use, about a
# second, with the same compiler).
#
# Build: launch/docker-host.sh (picks the base, fills the wheelhouse, builds, labels), or by hand
#   docker build -t dist-quant:latest .
#   docker build -t dist-quant:latest --build-arg BASE=dist-quant-base:bookworm .
# BASE: any Debian-like image; python3, venv, gcc and iproute2 are installed with apt only when
# it lacks them (the Debian base docker-host.sh makes has them, so that build needs no network).
# Python packages come from launch/wheelhouse when it holds wheels (pip install --no-index),
# else from the index pip is configured for (PIP_EXTRA_INDEX_URL: e.g. a CPU wheel index).
# Used by docker-compose.yml; the entrypoint is the script `dist-quant cluster` runs.
ARG BASE=python:3.11-slim
FROM ${BASE}

RUN need=""; \
    command -v python3 >/dev/null || need="$need python3"; \
    python3 -c "import ensurepip" 2>/dev/null || need="$need python3-venv"; \
    command -v tc >/dev/null || need="$need iproute2"; \
    command -v gcc >/dev/null || need="$need gcc libc6-dev"; \
    if [ -n "$need" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $need \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1

ARG PIP_EXTRA_INDEX_URL=
ARG TORCH_SPEC=torch==2.13.0
WORKDIR /app
COPY launch/wheelhouse /wheels
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-index --find-links /wheels "$TORCH_SPEC" numpy click \
            setuptools wheel; \
    else \
        pip install --no-cache-dir "$TORCH_SPEC" setuptools wheel; \
    fi
COPY pyproject.toml README.md ./
COPY dist_quant ./dist_quant
COPY launch/node.sh ./launch/node.sh
RUN pip install --no-cache-dir --no-index --no-build-isolation --no-deps -e . \
    && python -c "import dist_quant, torch, numpy, click"

# the kernels' cache inside the image, filled now with the default level (DIST_QUANT_ISA=native)
ENV DIST_QUANT_CACHE=/opt/dist_quant/kernels
RUN python -c "from dist_quant.compress import fast; print(fast.build())"

ENV OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 DQ_PYTHON=/opt/venv/bin/python
ENTRYPOINT ["/app/launch/node.sh", "run"]
