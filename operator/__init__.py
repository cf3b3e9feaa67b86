"""The Tandem Kubernetes operator (``tandem operator``): InferenceService -> Deployments and friends.

Modules, in the order data flows through them:

* ``spec.py``      the InferenceService spec as typed dataclasses (parse, defaults, validation);
* ``pods.py``      pure builders of the prefill / decode / router Deployments;
* ``objects.py``   pure builders of the Services, ConfigMap, RBAC, PDBs, HPAs, PodMonitor;
* ``reconcile.py`` applies the desired list (create / patch drift / delete stale) and the status;
* ``status.py``    pure computation of conditions and replica counts;
* ``kube.py``      a generic REST layer over the ``kubernetes`` client;
* ``handlers.py``  the kopf handlers (thin: they call ``reconcile``);
* ``cli.py``       ``tandem operator`` / ``python -m tandem.operator``: flags, then ``kopf.run``.

Importing this package does not import kopf: the builders are usable (and tested) without it.
"""
