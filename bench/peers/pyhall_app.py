#!/usr/bin/env python3
"""PyHall (pyhall-wcp 0.2.2) behind a small Flask app: a peer in bench/load.sh.

PyHall ships a library and a CLI, no HTTP server. This app serves its `make_decision` over
HTTP the way its own `pyhall route` command calls it (Registry, PolicyGate, the registry's
controls, availability and privilege-envelope callables), with the rules and registry record
in bench/peers/pyhall/ loaded once at start:

- the rule `docs-quickstart` (Hall's example rule of that id: cap.doc.summarize, dev, PUBLIC,
  worker.doc.summarize as the species wrk.doc.summarize);
- the tenants `your-org` and `org.you` as PyHall's signatory tenants (HallConfig
  require_signatory): PyHall rules cannot match on tenant_id, its Hall-wide allowlist can.

POST /api/route takes Hall's request body; fields PyHall requires and Hall does not have get the
defaults of `pyhall route` (tenant_risk "low", qos_class "P2", a fresh UUID as correlation_id).
The answer is PyHall's RouteDecision as JSON (`"denied": false` when allowed), 200 for every
decision, 400 for a request PyHall rejects. PyHall keeps no audit log: its telemetry envelopes
are part of the answer.

Served by werkzeug's threaded server (what `flask run` and `app.run()` use), without the
per-request access log (Hall writes none). Prints `listening on http://ADDR` on stderr.

Usage: python pyhall_app.py [HOST:PORT]   (default 127.0.0.1:0, a free port)
"""

import json
import logging
import sys
import uuid
from pathlib import Path

from flask import Flask, Response, request
from pydantic import ValidationError
from pyhall import HallConfig, PolicyGate, Registry, RouteInput, load_rules, make_decision
from werkzeug.serving import make_server

HERE = Path(__file__).resolve().parent / "pyhall"
RULES = load_rules(HERE / "rules.json")
REGISTRY = Registry(registry_dir=str(HERE / "registry"))
GATE = PolicyGate()
CONFIG = HallConfig(require_signatory=True, allowed_tenants=["your-org", "org.you"])
# The defaults of `pyhall route` for what a Hall request does not carry.
DEFAULTS = {"tenant_risk": "low", "qos_class": "P2"}

app = Flask(__name__)


def answer(status, doc):
    return Response(json.dumps(doc), status=status, mimetype="application/json")


@app.post("/api/route")
def route():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return answer(400, {"error": "the body must be a JSON object", "code": "bad_request"})
    fields = {**DEFAULTS, **body}
    fields.setdefault("correlation_id", str(uuid.uuid4()))
    try:
        inp = RouteInput(**fields)
    except ValidationError as exc:
        return answer(400, {"error": str(exc), "code": "bad_request"})
    decision = make_decision(
        inp=inp,
        rules=RULES,
        registry_controls_present=REGISTRY.controls_present(),
        registry_worker_available=REGISTRY.worker_available,
        registry_get_privilege_envelope=REGISTRY.get_privilege_envelope,
        registry_policy_allows_privilege=REGISTRY.policy_allows_privilege,
        policy_gate_eval=GATE.evaluate,
        hall_config=CONFIG,
        task_id="hall_bench_route",
    )
    return answer(200, decision.model_dump())


def main():
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0").rpartition(":")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(host, int(port), app, threaded=True)
    print(f"listening on http://{host}:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
