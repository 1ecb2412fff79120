#!/usr/bin/env python3
"""Checks a Grafana dashboard file (`just check-ops`): it is JSON, panel ids are unique, panels
fit the 24-column grid without overlapping, every query goes through the `datasource`
variable, and every PromQL expression parses (promtool, with Grafana's variables replaced).

Usage: check.py DASHBOARD.json   (promtool on PATH). Exits 1 naming each problem.
"""

import json
import os
import subprocess
import sys
import tempfile

# Grafana's variables, replaced by something PromQL accepts so the expression can be parsed.
VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$tenant": ".*",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def problems(dashboard):
    """Every problem found without promtool, and the expressions to parse: (name, expr)."""
    found, exprs, ids, cells = [], [], set(), {}
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    for name in ("datasource", "tenant"):
        if name not in variables:
            found.append(f"no `{name}` template variable")
    for panel in dashboard.get("panels", []):
        pid, title = panel.get("id"), panel.get("title", "?")
        where = f"panel {pid} ({title})"
        if pid in ids:
            found.append(f"{where}: duplicate id")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        x, y, w, h = (grid.get(k) for k in ("x", "y", "w", "h"))
        if None in (x, y, w, h) or x < 0 or w < 1 or h < 1 or x + w > 24:
            found.append(f"{where}: gridPos {grid} is off the 24-column grid")
            continue
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    found.append(f"{where}: overlaps {cells[(cx, cy)]} at x={cx}, y={cy}")
                    break
                cells[(cx, cy)] = where
            else:
                continue
            break
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            found.append(f"{where}: datasource is not {DATASOURCE}")
        targets = panel.get("targets", [])
        if not targets:
            found.append(f"{where}: no query")
        for target in targets:
            ref = target.get("refId", "?")
            if target.get("datasource") != DATASOURCE:
                found.append(f"{where} query {ref}: datasource is not {DATASOURCE}")
            if not target.get("expr"):
                found.append(f"{where} query {ref}: empty expression")
                continue
            exprs.append((f"panel {pid} ({title}) query {ref}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            exprs.append((f"annotation {annotation.get('name')}", annotation["expr"]))
    return found, exprs


def parse_errors(exprs):
    """promtool's complaints about the expressions, written as recording rules (JSON is YAML)."""
    rules, names = [], {}
    for i, (where, expr) in enumerate(exprs):
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        record = f"dashboard_expression_{i}"
        names[record] = where
        rules.append({"record": record, "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    try:
        run = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode == 0:
        return []
    out = run.stdout + run.stderr
    for record, where in names.items():
        out = out.replace(f'"{record}"', f'"{record}" = {where}')
    return [out.strip()]


def main():
    path = sys.argv[1]
    try:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: {e}")
    found, exprs = problems(dashboard)
    found += parse_errors(exprs)
    if found:
        print("\n".join(f"{path}: {p}" for p in found), file=sys.stderr)
        sys.exit(1)
    panels = sum(1 for p in dashboard["panels"] if p.get("type") != "row")
    print(f"{path}: ok ({panels} panels, {len(exprs)} PromQL expressions parse)")


if __name__ == "__main__":
    main()
