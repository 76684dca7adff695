#!/usr/bin/env python3
"""Checks Grafana dashboards and collects their PromQL for promtool.

Usage: dashboard_queries.py RULES_OUT DASHBOARD.json...

Each dashboard must be valid JSON with a uid and a title, and every panel (rows
included) and every query target must use the datasource uid `reach-prometheus`. Every
target's `expr` is written to RULES_OUT as a recording rule
(`dashboard:query:N`), so `promtool check rules RULES_OUT` parses every query offline.
Grafana's interval variables are replaced by a fixed range first; any other `$variable`
is left as is and fails the parse. Exits 1 with one line per problem.
"""

import json
import re
import sys

DATASOURCE_UID = "reach-prometheus"
# Grafana's built-in interval variables, which promtool cannot know.
INTERVAL_VARIABLES = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")


def panels(container):
    """Yields every panel, including those nested in collapsed rows."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def datasource_uid(holder):
    datasource = holder.get("datasource")
    return datasource.get("uid") if isinstance(datasource, dict) else None


def check(path, problems, queries):
    try:
        with open(path, encoding="utf-8") as file:
            dashboard = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        problems.append(f"{path}: not valid JSON: {error}")
        return
    for key in ("uid", "title"):
        if not dashboard.get(key):
            problems.append(f"{path}: the dashboard has no {key}")
    found = 0
    for panel in panels(dashboard):
        title = panel.get("title", f"panel {panel.get('id')}")
        if datasource_uid(panel) != DATASOURCE_UID:
            problems.append(f"{path}: panel {title!r} does not use datasource uid {DATASOURCE_UID}")
        for target in panel.get("targets", []):
            ref = target.get("refId", "?")
            if datasource_uid(target) not in (None, DATASOURCE_UID):
                problems.append(f"{path}: panel {title!r} query {ref} uses another datasource")
            expr = target.get("expr", "").strip()
            if not expr:
                problems.append(f"{path}: panel {title!r} query {ref} has no expr")
                continue
            queries.append((f"{path}: {title} ({ref})", INTERVAL_VARIABLES.sub("5m", expr)))
            found += 1
    if found == 0:
        problems.append(f"{path}: no panel query found")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, paths = sys.argv[1], sys.argv[2:]
    problems, queries = [], []
    for path in paths:
        check(path, problems, queries)
    rules = [
        {"record": f"dashboard:query:{n}", "expr": expr, "labels": {"source": source}}
        for n, (source, expr) in enumerate(queries)
    ]
    # JSON is valid YAML, and needs no YAML library.
    with open(out, "w", encoding="utf-8") as file:
        json.dump({"groups": [{"name": "dashboards", "rules": rules}]}, file, indent=1)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(queries)} queries from {len(paths)} dashboards written to {out}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
