# syntax=docker/dockerfile:1
#
# One image for the detector service (`detector-serve`, the default command) and the trainer
# (`detector-train`, what the compose `train` service runs).  See docs/DEPLOY.md.
#
#   docker build -t uncanny-detector:cu130 .                              # CUDA PyTorch (GPU)
#   docker build --build-arg TORCH_VARIANT=cpu -t uncanny-detector:cpu .  # CPU-only PyTorch
#
# TORCH_VARIANT names a wheel index of download.pytorch.org (cu130, cu128, cu126, ..., cpu) that
# carries TORCH_VERSION; CUDA wheels bring their own CUDA libraries, so the base stays a plain
# Python image and the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
# The base is pinned to an exact Python and Debian release; to pin it by digest as well, pass
# --build-arg PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:<digest>.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtual environment with PyTorch from the chosen index and the project, nothing else.
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VARIANT=cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The venv, then PyTorch from the chosen index, in a layer of its own: it is by far the largest
# download and changes less often than the project.  The install below then finds
# torch/torchvision already satisfied.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY detector ./detector
COPY training ./training
COPY service ./service

# A regular (not editable) install, so the runtime stage needs only /opt/venv; then the venv's
# own packaging tools go, since nothing installs anything at run time.
RUN pip install . \
    && pip uninstall --yes setuptools pip

# ---------------------------------------------------------------------------------------------
# runtime: the base image, the venv, an unprivileged user.  No compilers, sources or pip caches.
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cu130
LABEL org.opencontainers.image.title="uncanny-detector" \
      org.opencontainers.image.description="Adversarial-example detector service and trainer" \
      org.opencontainers.image.licenses="MIT" \
      io.uncanny-detector.torch-variant="${TORCH_VARIANT}"

# The base image's pip/setuptools/wheel are build tools too.  /bundles and /data belong to the
# service user, and Docker copies that ownership into a named volume the first time it mounts
# it there, so the unprivileged trainer can write bundles and downloaded datasets.
RUN python -m pip uninstall --yes --root-user-action=ignore pip setuptools wheel \
    && groupadd --system --gid 10001 detector \
    && useradd --system --uid 10001 --gid detector --create-home --home-dir /home/detector \
        --shell /usr/sbin/nologin detector \
    && mkdir /bundles /data \
    && chown detector:detector /bundles /data

COPY --from=build /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DETECTOR_HOST=0.0.0.0 \
    DETECTOR_PORT=8000

USER 10001:10001
WORKDIR /home/detector
EXPOSE 8000

# Liveness only (the process answers HTTP); compose checks readiness on top.  Plain Python, since
# the slim base has no curl and installing one would add a tool the service does not need.  The
# start period covers a plain `docker run` without DETECTOR_BUNDLE, where detector-serve first
# trains the embedded default bundle (about 20 s on a CPU) into the working directory.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('DETECTOR_PORT', '8000'), timeout=4)"]

CMD ["detector-serve"]
