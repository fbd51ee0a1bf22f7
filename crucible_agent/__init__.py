"""The Crucible storage agent: regions as real files, their state changes as events.

Run one per storage dataset::

    crucible-agent run --agent-id UUID --sled-id UUID --data-dir DIR \
        --capacity-bytes 10737418240 --create-delay lognormal:30,0.8,5,300

It takes commands on its own quorum queue ``crucible.<agent-id>`` (ensure, delete, get,
list), keeps its regions and an outbox in ``DIR/agent.sqlite``, writes each region's
extent files under ``DIR/regions/<region-id>/``, and publishes every state change as
``region.<state>`` on ``control.events``, once per generation, even across crashes and
broker outages. Layout: :mod:`~crucible_agent.regions` (rules, no I/O),
:mod:`~crucible_agent.store` and :mod:`~crucible_agent.files` (adapters),
:mod:`~crucible_agent.service` (handlers and background work),
:mod:`~crucible_agent.app` (composition root), :mod:`~crucible_agent.main` (CLI).
"""
