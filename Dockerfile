# One image for every service of compose.yaml: the entry points nexus, nexusctl,
# crucible-agent and sled-agent ([project.scripts] in pyproject.toml).
#
# BASE_IMAGE is any Debian bookworm image: the official debian:bookworm-slim where a
# registry is reachable, or the one scripts/docker/images.sh makes with debootstrap where
# none is (it passes --build-arg BASE_IMAGE=eventplane-debian:bookworm). Python is
# Debian's python3 (3.11 in bookworm) either way.
#
# Steps that fetch packages take an optional BuildKit secret `hostconf`: a script that
# points apt and pip at the building machine's package sources and CA certificates (what
# scripts/docker/images.sh passes; without it the image's own sources are used). Secrets
# stay out of the image and the build cache; the step deletes /tmp/hostconf before its
# layer is stored.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=secret,id=hostconf \
    if [ -s /run/secrets/hostconf ]; then . /run/secrets/hostconf; fi \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /tmp/hostconf
RUN python3 -m venv /opt/eventplane
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY nexus ./nexus
COPY crucible_agent ./crucible_agent
COPY sled_agent ./sled_agent
RUN --mount=type=secret,id=hostconf \
    if [ -s /run/secrets/hostconf ]; then . /run/secrets/hostconf; fi \
    && /opt/eventplane/bin/pip install . \
    && rm -rf /tmp/hostconf

FROM ${BASE_IMAGE}

# The venv's python is a link to the system's: the runtime needs python3 itself.
RUN --mount=type=secret,id=hostconf \
    if [ -s /run/secrets/hostconf ]; then . /run/secrets/hostconf; fi \
    && apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /tmp/hostconf
ENV PATH=/opt/eventplane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/eventplane /opt/eventplane
# A named volume mounted at /data starts with this directory's owner, so the agents
# (not root) can write their state there.
RUN groupadd --system --gid 10001 eventplane \
    && useradd --system --uid 10001 --gid eventplane --home-dir /home/eventplane \
        --create-home --shell /usr/sbin/nologin eventplane \
    && mkdir /data \
    && chown eventplane:eventplane /data
USER 10001:10001
WORKDIR /home/eventplane
# Each service of compose.yaml gives its own command and health check.
CMD ["nexus", "--help"]
