# -*- test-case-name: test.test_workers -*-
"""
C{python -m imageio.workers}: a worker process (spawned by
L{imageio.workers.mainside.WorkerPool} only).
"""

from __future__ import annotations

from imageio.workers.workerside import main

if __name__ == "__main__":
    main()
