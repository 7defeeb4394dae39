# anytime-fl runtime: flwr, torch and this project installed, for the
# SuperLink machine (it runs the ServerApp) and every SuperNode machine (they
# run the ClientApp). See docs/deployment.md.
#
#   docker build -t anytime-fl:cpu .
#   docker build -t anytime-fl:cu128 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The dependencies are baked in, so Flower must not install them again per
# run (it would fetch a CUDA torch from PyPI): the image switches that off.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# torch and torchvision come from PyTorch's own index: its CPU wheels are a
# fraction of PyPI's CUDA build, and torchvision matches the torch build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_HOME=/home/app/.flwr

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN useradd --create-home --uid 1000 --shell /bin/bash app \
    && mkdir -p /certs /data /outputs \
    && chown app:app /data /outputs

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" \
        > /etc/anytime-fl-constraints.txt

WORKDIR /opt/anytime-fl
COPY . .
# The constraint file holds the exact torch build installed above, so pip
# cannot swap it for another one while resolving the project's pins.
# `python -I` leaves the working directory off sys.path, so the check
# imports the installed package, not the copied source.
RUN pip install --no-cache-dir -c /etc/anytime-fl-constraints.txt . \
    && python -I -c "import anytime_fl, client_app.app, server_app.app, flwr, torch; print('anytime-fl ready: flwr', flwr.__version__, 'torch', torch.__version__)"

USER 1000:1000
WORKDIR /home/app
# The SuperLink's one port (Fleet, Control and Runtime APIs); SuperNodes
# only dial out and need no published port.
EXPOSE 8000
CMD ["python", "-m", "anytime_fl.supernode", "--help"]
