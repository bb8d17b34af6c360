"""``inspectd bench``: one run that measures the stages, the machine limit, the real daemon and the naive loop.

Speed is measured here, never in timed tests. CPU cost is measured as process CPU time (user + system of
all threads, ``time.process_time``), i.e. core-seconds, so multi-threaded stages are charged for every
core they use; throughput is measured in wall time.
"""
