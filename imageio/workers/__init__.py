# -*- test-case-name: test.test_workers -*-
"""
Worker processes: C{[daemon] workers = N} with N > 1.

The main process binds the listening sockets (remote, local) and keeps the
control service and the authoritative ticket store
(L{SharedTicketStore}). It never accepts on the images sockets: N worker
processes (C{python -m imageio.workers}, spawned and restarted by
L{WorkerPool}) adopt them (C{reactor.adoptStreamPort}) and serve C{/images}
and C{/info}, so TLS and HTTP parsing use N cores.

Each worker talks AMP with the main process over a socketpair:

    main -> worker   AddTicket, SetExpires, CancelTicket, RemoveTicket,
                     ClearTickets, CloseContext, ReloadTLS
    worker -> main   Hello (answered after the ticket snapshot),
                     OperationStarted, OperationsProgress (batched),
                     OperationFinished, ContextBound, ContextUnbound,
                     Touched

A worker authorizes against its replica (L{ReplicaStore}) without asking
the main process; the web layer sees the ordinary L{ITicketStore} /
L{Ticket} / L{Operation} API. Replica operations and bindings are reported
to the main process, which mirrors them on its tickets
(L{Ticket.adoptOperation}, L{Ticket.adoptContext}), so C{GET /tickets}
shows exact C{active}, C{connections}, C{transferred}, C{expires} and
C{idle_time} once an operation's finish report arrived; a running
operation's progress lags by at most L{PROGRESS_INTERVAL}.

Ordering carries the consistency: AMP is one ordered stream per worker.
A cancel in the main process marks the ticket canceled, sends
CancelTicket to every worker and waits for the answers; each worker
answers after it flagged its operations and after every report it sent
before, so when the answers are in the main process knows every
operation that can still touch the image, and waits for those
(C{remove_timeout}, 409) exactly as one process does. Control requests
that change tickets answer only once every worker acknowledged the change
(L{SharedTicketStore.flush}).

The modules: L{commands} (the AMP commands and the file descriptors the
two sides share), L{mainside} (the main process: L{SharedTicketStore},
L{WorkerPool}), L{workerside} (a worker process: L{ReplicaStore},
L{WorkerService} and its entry point, C{python -m imageio.workers}).
"""
