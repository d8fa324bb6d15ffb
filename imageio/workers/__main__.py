# -*- test-case-name: test.test_workers -*-
"""
C{python -m imageio.workers}: a worker process (spawned by
L{imageio.workers.mainside.WorkerPool} only).
"""

from imageio.workers.workerside import main

main()
