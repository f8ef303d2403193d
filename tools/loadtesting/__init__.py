"""tools/loadtest.py's parts: the server under test (``server``), the request mix
(``workload``), the two phases that drive it (``phases``) and the report (``report``)."""
