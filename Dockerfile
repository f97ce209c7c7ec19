# ArborSeg BIDS App image.
#   CPU (default):  docker build -t arborseg/arborseg:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t arborseg/arborseg:0.1.0-cuda .
#   run:            docker run --rm -v /data/bids:/data:ro -v /data/out:/out -v /scratch:/work \
#                     arborseg/arborseg:0.1.0 /data /out participant -w /work
# ARBORSEG_VERSION must equal bids_app/_version.py (tests/test_container.py checks it).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# ---------------------------------------------------------------- build: environment + resources
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY tools/install.sh tools/install.sh
COPY bids_app/ bids_app/
COPY workflows/ workflows/
# the same script CI runs (.ci/run); the model weights are package data and come with it
RUN ARBORSEG_TORCH="${TORCH_VARIANT}" bash tools/install.sh /opt/arborseg/venv
# templates and atlases of bids_app/data/resources.json, each verified by sha256, in a world-readable cache
RUN /opt/arborseg/venv/bin/arborseg-resources fetch --cache-dir /opt/arborseg/cache \
 && chmod -R a+rX,go-w /opt/arborseg

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG ARBORSEG_VERSION=0.1.0
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="ArborSeg" \
      org.opencontainers.image.description="BIDS App: whole-brain and cerebellar-lobule segmentation with ensembles of 3D CNNs" \
      org.opencontainers.image.version="${ARBORSEG_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.arborseg.torch-variant="${TORCH_VARIANT}"
COPY --from=build /opt/arborseg /opt/arborseg
# Pango, HarfBuzz (font subsetting) and a font for WeasyPrint, which writes the PDF reports
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        libpango-1.0-0=1.50.12+ds-1 libpangoft2-1.0-0=1.50.12+ds-1 libharfbuzz-subset0=6.0.0+dfsg-3 \
        fonts-dejavu-core=2.37-6 \
 && rm -rf /var/lib/apt/lists/*
# a non-root default user; any other UID works too (docker run --user, Singularity): nothing is written
# to $HOME, and the working folder is world-writable scratch
RUN useradd --no-log-init --uid 1000 --user-group --create-home --home-dir /home/arborseg \
        --shell /usr/sbin/nologin arborseg \
 && mkdir -p /work && chmod 1777 /work
ENV PATH="/opt/arborseg/venv/bin:${PATH}" \
    ARBORSEG_CACHE_DIR=/opt/arborseg/cache \
    ARBORSEG_OFFLINE=1 \
    ARBORSEG_UMASK=0022 \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER arborseg
WORKDIR /work
ENTRYPOINT ["arborseg"]
CMD ["--help"]
