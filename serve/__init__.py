"""`tandem serve`: a whole Tandem deployment (router + prefill and decode pools) on one machine,
each role its own process running the same command a Kubernetes pod runs, under a supervisor
(local processes, or Ray actors with --launcher ray)."""
