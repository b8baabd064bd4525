#!/usr/bin/env python3
"""Generate tests/pyhall/expected.json: PyHall's own decisions for every test request.

Run once (the output is checked in), with PyHall installed:

    python3 -m venv /tmp/pyhall && /tmp/pyhall/bin/pip install pyhall-wcp==0.2.2
    /tmp/pyhall/bin/python tests/pyhall/gen_expected.py

For each case directory (the hello_worker example and cases/*), every request over the
case's capabilities (plus one nobody declares) x PyHall's envs x labels x two tenant_risk
and two qos_class values is decided with pyhall.make_decision, with the registry's
controls, availability and privilege-envelope callables and a correlation id, as an app
using PyHall's defaults would. tests/pyhall_import.rs imports the same files with
`hall import pyhall` and compares Hall's decisions with these.
"""

import json
from pathlib import Path

import pyhall
from pyhall import Registry, RouteInput, load_rules_from_dict, make_decision

HERE = Path(__file__).resolve().parent
ENVS = ["dev", "stage", "prod", "edge"]
LABELS = ["PUBLIC", "INTERNAL", "RESTRICTED"]
RISKS = ["low", "high"]
QOS = ["P0", "P2"]
# One decision is one JSON array with these fields, in this order.
FIELDS = ["capability_id", "env", "data_label", "tenant_risk", "qos_class",
          "denied", "worker", "code", "matched_rule_id"]


def load_case(d: Path):
    rules_doc = json.loads((d / "rules.json").read_text())
    records = []
    for f in sorted(d.glob("*.json")):
        if f.name == "rules.json":
            continue
        doc = json.loads(f.read_text())
        records.extend(doc if isinstance(doc, list) else [doc])
    return rules_doc, records


def capabilities(rules_doc, records):
    caps = set()
    for r in records:
        caps.update(c for c in r.get("capabilities", []) if isinstance(c, str))
    for r in rules_doc["rules"]:
        c = (r.get("match") or {}).get("capability_id")
        if isinstance(c, str):
            caps.add(c)
        elif isinstance(c, dict) and isinstance(c.get("in"), list):
            caps.update(x for x in c["in"] if isinstance(x, str))
    caps.add("cap.nobody.declares")
    return sorted(caps)


def main():
    out = {"pyhall_version": getattr(pyhall, "__version__", "0.2.2"), "cases": {}}
    case_dirs = [HERE / "hello_worker"] + sorted(p for p in (HERE / "cases").iterdir() if p.is_dir())
    for d in case_dirs:
        rules_doc, records = load_case(d)
        rules = load_rules_from_dict(rules_doc)
        reg = Registry()
        for r in records:
            reg.enroll(r)
        decisions = []
        for cap in capabilities(rules_doc, records):
            for env in ENVS:
                for label in LABELS:
                    for risk in RISKS:
                        for qos in QOS:
                            inp = RouteInput(
                                capability_id=cap, env=env, data_label=label,
                                tenant_risk=risk, qos_class=qos, tenant_id="org.demo",
                                correlation_id="550e8400-e29b-41d4-a716-446655440000",
                            )
                            dec = make_decision(
                                inp=inp, rules=rules,
                                registry_controls_present=reg.controls_present(),
                                registry_worker_available=reg.worker_available,
                                registry_get_privilege_envelope=reg.get_privilege_envelope,
                                registry_policy_allows_privilege=reg.policy_allows_privilege,
                            )
                            decisions.append({
                                "capability_id": cap, "env": env, "data_label": label,
                                "tenant_risk": risk, "qos_class": qos,
                                "denied": dec.denied,
                                "worker": dec.selected_worker_species_id,
                                "code": (dec.deny_reason_if_denied or {}).get("code"),
                                "matched_rule_id": dec.matched_rule_id,
                            })
        out["cases"][str(d.relative_to(HERE))] = decisions
    # One decision a line: small diffs when PyHall or a case changes.
    lines = ['{"pyhall_version": %s, "fields": %s, "cases": {'
             % (json.dumps(out["pyhall_version"]), json.dumps(FIELDS))]
    names = list(out["cases"])
    for i, name in enumerate(names):
        lines.append("%s: [" % json.dumps(name))
        rows = [json.dumps([x[k] for k in FIELDS]) for x in out["cases"][name]]
        lines.append(",\n".join(rows))
        lines.append("]" + ("," if i + 1 < len(names) else ""))
    lines.append("}}")
    (HERE / "expected.json").write_text("\n".join(lines) + "\n")
    print(sum(len(v) for v in out["cases"].values()), "decisions written")


if __name__ == "__main__":
    main()
