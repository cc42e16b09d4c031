# wsi-nuclei, CPU image. Build:  docker build -t wsi-nuclei .
# Run:    docker run --rm -v "$PWD":/data wsi-nuclei run /data/slide.svs --out /data/out
# For CUDA, start from a CUDA-enabled PyTorch image instead and skip the CPU torch install.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# CPU build of torch first (a bare 'torch' requirement would pull the CUDA packages).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}

WORKDIR /opt/wsi-nuclei
COPY pyproject.toml README.md ./
COPY wsi_nuclei ./wsi_nuclei
COPY configs ./configs
RUN pip install .

WORKDIR /data
ENTRYPOINT ["wsi-nuclei"]
CMD ["--help"]
