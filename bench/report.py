"""Markdown tables from a benchmark's results.json (``python -m bench.report FILE``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nexus.sagas.disk_create import REPLICAS


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def _ratio(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def render(results: dict[str, Any]) -> str:
    """Every phase the run has (``bench.run --only`` runs some of them)."""
    lines: list[str] = []
    if "floor" in results and "strategies" in results:
        lines += _strategies(results)
    if "throughput" in results:
        lines += _throughput(results)
    if "scale" in results:
        lines += _scale(results)
    if "polling_scale" in results:
        lines += _polling_scale(results)
    if "longpoll" in results:
        lines += _longpoll(results)
    if "peers" in results:
        lines += _peers(results)
    return "\n".join(lines) + "\n"


def _strategies(results: dict[str, Any]) -> list[str]:
    floor = results["floor"]
    lines = [
        "### Floor (this machine, this run)",
        "",
        "| measure | p50 | p99 |",
        "|---|---|---|",
        f"| AMQP hop, publish with confirm → consumed (quorum queue) | "
        f"{_ms(floor['amqp_hop_ms']['p50'])} ms | {_ms(floor['amqp_hop_ms']['p99'])} ms |",
    ]
    for kind, commit in floor["commit_ms"].items():
        lines.append(
            f"| one small commit, {kind} | {_ms(commit['p50'])} ms | {_ms(commit['p99'])} ms |"
        )
    lines += [
        f"| **floor = hop + PostgreSQL commit (p50)** | **{_ms(floor['floor_ms'])} ms** | |",
        "",
        "### Wait strategies (same run, same seeded workload, 2 replicas, PostgreSQL)",
        "",
        "| strategy | wake p50 | wake p99 | wake max | wake mean | x floor (p50) | "
        "disk create p50 | disk create p99 | requests to agents per disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, data in results["strategies"].items():
        wake = data["wake_ms"]
        create = data["disk_create_s"]
        lines.append(
            f"| {label} | {_ms(wake['p50'])} ms | {_ms(wake['p99'])} ms | "
            f"{_ms(wake['max'])} ms | {_ms(wake['mean'])} ms | "
            f"{wake['p50'] / floor['floor_ms']:,.1f} | {create['p50']:.1f} s | "
            f"{create['p99']:.1f} s | {data['requests_per_disk']['mean']:.1f} |"
        )
    event = results["strategies"]["event-driven"]["wake_ms"]["mean"]
    lines.append("")
    for label, data in results["strategies"].items():
        if label != "event-driven":
            lines.append(
                f"- mean wake overhead, {label} / event-driven: "
                f"**{_ratio(data['wake_ms']['mean'] / event)}x**"
            )
    return lines


def _throughput(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Throughput (no region delay)",
        "",
        "| configuration | disk-create sagas/s | PostgreSQL commits per saga | "
        "CPU seconds per saga, by process |",
        "|---|---|---|---|",
    ]
    for label, data in results["throughput"].items():
        cpu = ", ".join(
            f"{name} {seconds * 1000:.0f} ms"
            for name, seconds in data["cpu_seconds_per_saga"].items()
        )
        commits = data.get("commits_per_saga")
        per_saga = f"{commits:.1f}" if commits else "-"
        lines.append(f"| {label} | {data['sagas_per_second']:.1f} | {per_saga} | {cpu} |")
    half = results.get("half_load")
    if half:
        lines += [
            "",
            f"Wake overhead at half the 2-replica throughput ({half['offered_per_second']:.1f} "
            f"disks/s, region delay 50 ms): p50 {_ms(half['wake_ms']['p50'])} ms, "
            f"p99 {_ms(half['wake_ms']['p99'])} ms ({half['states']}).",
        ]
    return lines


def _scale(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### Scale (sagas parked at once)",
        "",
        "| parked | waiting when measured | parked in | requests to agents while parked | "
        "Nexus RSS | CPU while parked (fraction of a core) | wake p50 | wake p99 | "
        "last tenth woken: p50 / p99 | probe wake (one at a time, while parked): p50 / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in results["scale"].values():
        rss = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in data["nexus_rss_mib"].items())
        cpu = ", ".join(f"{name} {share:.2f}" for name, share in data["idle_cpu_fraction"].items())
        last = data.get("wake_last_tenth_ms")
        tail = f"{_ms(last['p50'])} / {_ms(last['p99'])} ms" if last else "-"
        probe = data.get("probe_wake_ms")
        probes = f"{_ms(probe['p50'])} / {_ms(probe['max'])} ms (n={probe['n']})" if probe else "-"
        lines.append(
            f"| {data['parked']:,} | {data.get('sagas_waiting_at_measurement', '-'):,} | "
            f"{data['create_seconds']:.0f} s | {data['agent_requests_while_parked']} | {rss} | "
            f"{cpu} | {_ms(data['wake_ms']['p50'])} ms | {_ms(data['wake_ms']['p99'])} ms | "
            f"{tail} | {probes} |"
        )
    return lines


def _polling_scale(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "### The pollers with as many disks waiting (their regions never ready meanwhile)",
        "",
        "| strategy | window | disks waiting | region waits | requests to agents per second "
        "(of which timed out) | effective interval per region | agent backlog, start → end "
        "| CPU (fraction of a core) | agent CPU per request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    scale = results.get("scale", {})
    parked = scale.get(str(max((int(k) for k in scale), default=0)))
    if parked:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in parked["idle_cpu_fraction"].items())
        lines.append(
            f"| event-driven (scale phase) | parked | {parked['sagas_waiting_at_measurement']:,} "
            f"| {REPLICAS * parked['sagas_waiting_at_measurement']:,} | "
            f"{parked['agent_requests_while_parked']} | none (no polls) | - | {cpu} | - |"
        )
    for label, data in results["polling_scale"].items():
        for window_name in ("after_creates", "steady"):
            window = data.get(window_name)
            if window is None:
                continue
            rate = window["requests_per_second"]
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in window["cpu_fraction"].items())
            # Only once polls are all the agents do (right after the creates they are
            # still taking the ensure commands).
            per_request = (
                window.get("agent_cpu_ms_per_request") if window_name == "steady" else None
            )
            interval = f"{window['region_waits'] / rate:,.0f} s" if rate else "-"
            lines.append(
                f"| {label} | {window_name.replace('_', ' ')} | {window['sagas_waiting']:,} | "
                f"{window['region_waits']:,} | {rate:,.1f} "
                f"({window['timed_out_per_second']:,.1f}) | "
                f"{interval} | "
                f"{window['agent_backlog']['start']:,} → {window['agent_backlog']['end']:,} | "
                f"{cpu} | {f'{per_request:.1f} ms' if per_request else '-'} |"
            )
    on_schedule = [
        f"{label}: {data['requests_per_second_on_schedule']:,.0f} requests/s"
        for label, data in results["polling_scale"].items()
        if data.get("requests_per_second_on_schedule")
    ]
    if on_schedule:
        lines += ["", "Every poll on time would be " + "; ".join(on_schedule) + "."]
    return lines


def _peers(results: dict[str, Any]) -> list[str]:
    peers = results["peers"]
    version = peers["dbos"].get("dbos_version", "?")
    lines = [
        "",
        f"### Peers: this engine and DBOS Transact {version}, trivial agents, same run",
        "",
        "| in flight | disks | this engine: disks/s | DBOS: disks/s | this engine: wake p50 / "
        "p99 | DBOS: wake p50 / p99 | this engine: CPU ms per disk |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in peers["levels"]:
        key = str(level["in_flight"])
        ours, dbos = peers["ours"][key], peers["dbos"][key]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in ours["cpu_ms_per_disk"].items())
        lines.append(
            f"| {level['in_flight']} | {level['disks']} | {ours['per_second']:.1f} | "
            f"{dbos['per_second']:.1f} | {_ms(ours['wake_ms']['p50'])} / "
            f"{_ms(ours['wake_ms']['p99'])} ms | {_ms(dbos['wake_ms']['p50'])} / "
            f"{_ms(dbos['wake_ms']['p99'])} ms | {cpu} |"
        )
    whole = peers["dbos"].get("cpu_ms_per_disk_whole_run", {})
    dbos_levels = [peers["dbos"][str(level["in_flight"])] for level in peers["levels"]]
    app = ", ".join(
        f"{level['in_flight']} in flight {level['app_cpu_ms_per_disk']:.0f}"
        for level in dbos_levels
    )
    commits = ", ".join(
        f"{level['in_flight']} in flight: this engine "
        f"{peers['ours'][str(level['in_flight'])].get('commits_per_disk', 0):.1f}, "
        f"DBOS {level.get('commits_per_disk', 0):.1f}"
        for level in dbos_levels
    )
    lines += [
        "",
        f"DBOS CPU ms per disk: the application {app}; over the whole run "
        + ", ".join(f"{k} {v:.0f}" for k, v in whole.items())
        + f". PostgreSQL commits per disk: {commits}"
        + ". Load average (1, 5, 15 min) before, between, after: "
        + "; ".join(
            ", ".join(f"{x:.1f}" for x in values)
            for values in peers.get("load_average_1_5_15", {}).values()
        )
        + ".",
    ]
    return lines


def _longpoll(results: dict[str, Any]) -> list[str]:
    data = results["longpoll"]
    scale = data["scale"]
    agents = ", ".join(
        f"{name} {scale['agent_rss_mib_before'][name]:.0f} → {mib:.0f} MiB"
        for name, mib in sorted(scale["agent_rss_mib_holding"].items())
    )
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(scale["cpu_fraction_holding"].items()))
    lines = [
        "",
        "### The long poll at scale (a model of Nexus's end, real agents)",
        "",
        "| regions waiting | polls in flight | requests/s | unanswered | Nexus-end RSS "
        "(model) | agents' RSS, before → holding | CPU while holding (fraction of a core) |",
        "|---|---|---|---|---|---|---|",
        f"| {scale['regions']:,} | {scale['loops_running']:,} | "
        f"{scale['requests_per_second']:,.0f} | {scale['unanswered']:,} | "
        f"{scale['rss_mib_before']:.0f} → {scale['rss_mib_holding']:.0f} MiB | {agents} | "
        f"{cpu} |",
        "",
        "### A replica SIGKILLed while it waits for a disk's regions",
        "",
        "| saga | region ready after | wait deadline | wake, no kill | wake, replica killed "
        "| disk done after the kill |",
        "|---|---|---|---|---|---|",
    ]
    for label, kill in data["kill"].items():
        lines.append(
            f"| {label} | {kill['region_delay_seconds']:.0f} s | "
            f"{kill['wait_deadline_seconds']:.0f} s | {_ms(kill['wake_ms_control']['p50'])} ms "
            f"| {_ms(kill['wake_ms_killed']['p50'])} ms (max "
            f"{_ms(kill['wake_ms_killed']['max'])}) | "
            f"{kill['disk_finished_seconds_after_kill']:.1f} s |"
        )
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json")
    print(render(json.loads(path.read_text())))
