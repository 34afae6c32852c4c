"""`python -m dashboards`: regenerate the committed Grafana JSON from the boards' code."""

from dashboards import write

for path in write():
    print(path)
