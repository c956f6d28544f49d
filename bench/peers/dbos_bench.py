"""The benchmark's shape on DBOS: N workflows of 6 durable no-op steps, on
SQLite, started at once and waited for. Prints `runs/s transitions/s`.

Usage: python dbos_bench.py RUNS DATABASE_FILE
"""

import sys
import time

from dbos import DBOS, DBOSConfig

STEPS = 6


@DBOS.step()
def step(n: int) -> int:
    return n


@DBOS.workflow()
def run(index: int) -> int:
    for n in range(STEPS):
        step(n)
    return index


def main() -> None:
    runs, database = int(sys.argv[1]), sys.argv[2]
    config: DBOSConfig = {"name": "evalflow-peer-bench", "system_database_url": f"sqlite:///{database}"}
    DBOS(config=config)
    DBOS.launch()
    for handle in [DBOS.start_workflow(run, -1 - i) for i in range(min(runs, 100))]:
        handle.get_result()  # warm up
    start = time.perf_counter()
    handles = [DBOS.start_workflow(run, i) for i in range(runs)]
    for handle in handles:
        handle.get_result()
    secs = time.perf_counter() - start
    print(f"{runs / secs:.1f} {runs * STEPS / secs:.1f}")
    DBOS.destroy()


if __name__ == "__main__":
    main()
