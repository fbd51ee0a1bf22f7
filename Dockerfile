# One image for every service of compose.yaml: the entry points nexus, nexusctl,
# crucible-agent and sled-agent ([project.scripts] in pyproject.toml).
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/eventplane
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY nexus ./nexus
COPY crucible_agent ./crucible_agent
COPY sled_agent ./sled_agent
RUN /opt/eventplane/bin/pip install .

FROM python:3.11-slim

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
