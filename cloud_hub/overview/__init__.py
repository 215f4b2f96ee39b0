"""The fleet overview the dashboard shows: read-only queries over the fleet's and ingest's tables.

It sits above both: ``fleet`` (what devices should run) never reads what ingest stores (what
they report), and showing the two side by side should not make it start.
"""
