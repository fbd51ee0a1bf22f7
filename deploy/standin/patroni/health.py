#!/usr/bin/env python3
"""Health checks of compose.ha.yaml's database services (the image has no curl).

``health.py patroni``: Patroni's /readiness, 200 once PostgreSQL runs as the leader or as
a replica that streams from it. ``health.py etcd``: etcd's /health, {"health": "true"}.
"""

import json
import sys
import urllib.request

URLS = {
    "patroni": "http://127.0.0.1:8008/readiness",
    "etcd": "http://127.0.0.1:2379/health",
}

what = sys.argv[1] if len(sys.argv) > 1 else "patroni"
with urllib.request.urlopen(URLS[what], timeout=5) as response:  # raises on non-2xx
    body = response.read()
if what == "etcd" and json.loads(body).get("health") != "true":
    sys.exit(f"etcd: {body!r}")
