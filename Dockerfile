# wsi-nuclei container image: CPU by default, CUDA with one build argument.
#
# CPU (default; torch from the PyTorch CPU index, no CUDA packages):
#   docker build -t wsi-nuclei .
#   docker run --rm -v "$PWD":/data wsi-nuclei run /data/slide.svs --out /data/out
# CUDA (torch's CUDA wheels bring their own CUDA runtime; the host needs an NVIDIA driver and
# the NVIDIA Container Toolkit; pick the cuXXX index that matches your driver on pytorch.org):
#   docker build -t wsi-nuclei:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --gpus all -v "$PWD":/data wsi-nuclei:cuda run /data/slide.svs --out /data/out --device cuda
# The image runs as the unprivileged user 'wsi' (uid 1000); to write into a mounted folder owned
# by another uid, add --user "$(id -u):$(id -g)". configs/ (training recipes, validation split)
# is found from any working directory: --config configs/train_default.json works in /data too.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WSI_NUCLEI_CONFIGS=/opt/wsi-nuclei/configs

# torch first, from the chosen index: a bare 'torch' requirement would pull the CUDA build
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/wsi-nuclei
COPY pyproject.toml README.md ./
COPY wsi_nuclei ./wsi_nuclei
COPY configs ./configs
RUN pip install . \
    && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin wsi \
    && mkdir /data \
    && chown wsi:wsi /data

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["wsi-nuclei"]
CMD ["--help"]
